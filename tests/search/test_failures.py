"""Faults during a search: a trial whose loss becomes NaN, and a tracking server that goes
away mid-search and comes back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import free_port
from mlflow.tracking import MlflowClient

from difftune.search.cli import main


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("difftune.role") == "trial"]


def test_nan_trial_is_recorded_failed_retried_and_the_search_goes_on(ray_session, tmp_path):
    space = tmp_path / "nan.yaml"
    space.write_text("""
model: demo
search: {trials: 3, seed: 0, max_concurrent: 1, max_failures: 1, grace_period: 1}
fixed: {head: mlp, epochs: 1, block: 10, t: 10, pool: 1, momentum: 0.9}
params:
  lr: {choice: [1.0e+30, 0.05]}
paper_config: {lr: 1.0e+30}
""")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["search", "--space", str(space), "--experiment", "nan", "--tracking-uri", uri,
               "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache")])
    assert rc == 0
    client = MlflowClient(uri)
    runs = trial_runs(client, "nan")
    assert len(runs) == 3 and len({r.data.tags["difftune.trial_id"] for r in runs}) == 3
    failed = [r for r in runs if r.info.status == "FAILED"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert failed and finished
    for r in failed:
        assert "loss became nan" in r.data.tags["error"].lower() or "loss became inf" in \
            r.data.tags["error"].lower()
        assert r.data.tags["failures"] == "2"  # failed, retried once (max_failures: 1), failed
        assert r.data.params["lr"] == "1e+30"
    version = client.get_model_version_by_alias("difftune-nan", "champion")
    assert version.run_id in {r.info.run_id for r in finished}



def start_server(root, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    stop(proc)
    pytest.fail("mlflow server did not start")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and the workers it spawned (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    proc.wait()


def test_tracking_server_away_mid_search_records_arrive_when_back(ray_session, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    space = tmp_path / "s.yaml"
    space.write_text("""
model: demo
search: {trials: 4, seed: 1, max_concurrent: 1, grace_period: 2}
fixed: {head: linear, epochs: 2, pool: 1, momentum: 0.9, batch_size: 128}
params:
  block: {choice: [7, 10, 13]}
  lr: {float: [0.01, 0.1], log: true}
""")
    search = subprocess.Popen(
        [sys.executable, "-m", "difftune.search.cli", "search", "--space", str(space), "--experiment",
         "outage", "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
         "--cache", str(tmp_path / "cache"),
         "--address", ray_session.get_runtime_context().gcs_address],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while not any(r.info.status == "FINISHED" for r in trial_runs(client, "outage")):
            assert search.poll() is None, search.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1)
        stop(server)  # the tracking server goes away while trials run
        time.sleep(15)
        assert search.poll() is None, search.stderr.read()[-3000:]  # it did not die with it
        server = start_server(tmp_path, port)
        _, err = search.communicate(timeout=400)
        assert search.returncode == 0, err[-2000:]
        runs = trial_runs(client, "outage")
        assert len(runs) == 4 and len({r.data.tags["difftune.trial_id"] for r in runs}) == 4
        assert all(r.info.status == "FINISHED" for r in runs)
        for r in runs:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")]
            assert steps == sorted(set(steps)) and steps  # each epoch once
        assert client.get_model_version_by_alias("difftune-outage", "champion")
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
        stop(server)
