"""`difftune ui` serves the MLflow UI on 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from helpers import free_port


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                out.add(addr)
    return out


def test_ui_binds_to_loopback_only(tmp_path):
    port = free_port()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "difftune.search.cli", "ui", "--tracking-uri", uri,
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the UI did not come up"
                time.sleep(0.5)
        addrs = listening_addresses(port)
        assert addrs == {"0100007F"}, addrs  # 127.0.0.1 only, not 0.0.0.0 or ::
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
