"""Plain helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: moto accepts any credentials; pyarrow and boto read them from the environment
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


#: moto's server, one request at a time. Threaded (``python -m moto.server``), it checks the
#: condition of a conditional PUT (If-None-Match, If-Match) and stores the object in two steps
#: that two threads can interleave; S3 does both at once, and so does moto in one thread.
MOTO_ONE_THREAD = """
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app),
           threaded=False)
"""


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str, monkeypatch, *, threaded: bool = True
            ) -> Iterator[str]:
    """A moto S3 server of our own on 127.0.0.1 with ``bucket`` created; yields the query
    every ``s3://`` URI on it needs (``endpoint_override=...&scheme=http&region=...``).
    ``threaded=False``: one request at a time (:data:`MOTO_ONE_THREAD`), for tests of
    conditional writes. Stopped by pid afterwards."""
    import pyarrow.fs as pafs

    port = free_port()
    cmd = ([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"]
           if threaded else [sys.executable, "-c", MOTO_ONE_THREAD, str(port)])
    with open(log_dir / "moto.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        for k, v in MOTO_ENV.items():
            monkeypatch.setenv(k, v)
        try:
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                   region="us-east-1", allow_bucket_creation=True)
            deadline = time.monotonic() + 180  # moto imports slowly on a busy machine
            while True:
                try:
                    fs.create_dir(bucket)
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, "moto died"
                    time.sleep(0.2)
            # allow_delayed_open: small objects go up in one PutObject; moto 5.2.1 answers
            # CompleteMultipartUpload with a root tag pyarrow rejects (getmoto/moto#10055)
            yield (f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
                   "&allow_delayed_open=true")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# --------------------------------------------------------------------------------------
# A real MLflow server and a real browser (the UI tests and benchmarks/screenshots.py)
# --------------------------------------------------------------------------------------

#: Debian's Chromium (`.ci/run` installs it); Playwright drives it, nothing is downloaded
CHROMIUM = "/usr/bin/chromium"
#: a headless Chromium that makes no connection of its own (the machine's network is closed)
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync")


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store and artifacts under ``root``);
    yields its URI and stops it (and the workers it spawned) afterwards."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: see {root}/mlflow-server.log"
                                       ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start in 180 s") from None
                time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@contextlib.contextmanager
def chromium_page(user_data_dir: Path, *, width: int = 1400, height: int = 900):
    """A page of a headless Debian Chromium with a fresh profile, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM, headless=True,
            viewport={"width": width, "height": height}, args=list(CHROMIUM_ARGS))
        try:
            yield context.new_page()
        finally:
            context.close()


def trial_runs(client, experiment: str) -> list:
    """The trial runs (``difftune.role`` trial) of ``experiment`` in an MLflow store."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("difftune.role") == "trial"]
