"""What a single-machine user exposes: `difftune ui` serves the MLflow UI on 127.0.0.1
unless --host says otherwise, and the local Ray of a search listens on loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
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
    proc = subprocess.Popen([sys.executable, "-m", "difftune", "ui", "--tracking-uri", uri,
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


#: how /proc/net/tcp* spell loopback: 127.0.0.1, the same mapped into IPv6, and ::1
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_sockets_of(pids: set[int]) -> set[tuple[str, int]]:
    """(local address, port) of every listening TCP socket the processes ``pids`` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        except OSError:  # gone meanwhile
            continue
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(name).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addr, port = fields[1].split(":")
                out.add((addr, int(port, 16)))
    return out


def test_a_local_search_listens_on_loopback_only(tmp_path):
    """Every process of the Ray a single-machine search starts (GCS, raylet, agents,
    workers) listens on 127.0.0.1 only, as does the search itself."""
    temp = tempfile.mkdtemp(prefix="dtl", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update({"RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "difftune", "search", "--trials", "1",
         "--set", "epochs=1", "--experiment", "lo", "--tracking-uri",
         f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "runs"),
         "--cache", str(tmp_path / "cache")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    try:
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
                names |= {p.name() for p in tree}
            except psutil.Error:
                continue
            seen |= listening_sockets_of({p.pid for p in tree})
            time.sleep(0.3)
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
    assert {"gcs_server", "raylet"} <= names  # the search started a Ray of its own
    assert len(seen) >= 3 and {addr for addr, _ in seen} <= LOOPBACK, sorted(seen)


def test_ui_prints_the_link_to_each_difftune_experiment(tmp_path):
    """Beside its address, `difftune ui` prints the link a search prints to each difftune
    experiment's runs (the shared view with the key columns, by the latest search's
    metric); an experiment without a difftune search is not listed."""
    from mlflow.tracking import MlflowClient

    from difftune.search.records.tracking import start_parent_run
    from difftune.search.report.ui_view import VIEW_TAG, experiment_view, view_link
    from difftune.search.space.spec import load_space

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    ids = {}
    for name in ("difftune-a", "difftune-b"):
        space = load_space("demo").resolved()
        if name.endswith("b"):
            space["search"] = {**space["search"], "metric": "val_loss", "mode": "min"}
        parent = start_parent_run(client, name, space_dict=space, runtime={},
                                  tune_path=str(tmp_path / name), model_name=name)
        ids[name] = client.get_run(parent).info.experiment_id
        assert client.get_run(parent).data.params["metric"] == space["search"]["metric"]
        time.sleep(0.01)  # b's search starts later
    client.create_run(client.create_experiment("not-a-search"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "difftune", "ui", "--tracking-uri",
                             uri, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(3)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    address = f"http://127.0.0.1:{port}"
    assert lines[0].startswith(f"MLflow UI on {address}  (mlflow ui on {uri})"), lines
    exp = {name: client.get_experiment(i) for name, i in ids.items()}
    want = {}
    for name, metric in (("difftune-a", "val_top1"), ("difftune-b", "val_loss")):
        key = experiment_view(client, ids[name], metric=metric)  # the same state: the same key
        assert f"{VIEW_TAG}{key}" in exp[name].tags  # stored in the store the UI serves
        assert f"`{metric}`" in exp[name].tags[f"{VIEW_TAG}{key}"]
        want[name] = f"  {name}: {view_link(address, ids[name], key)}"
    assert sorted(lines[1:]) == sorted(want.values()), lines
    assert lines[1] == want["difftune-b"]  # the most recent search first
    assert "workflowType=machine_learning" in lines[1] and "viewStateShareKey=" in lines[1]
