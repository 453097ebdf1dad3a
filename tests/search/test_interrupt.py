"""Ctrl-C (SIGINT) and SIGTERM (``ray job stop``) sent to a real search's driver: the trials in
flight stop, one line says how many of how many trials ran and how to continue, the exit code
is 128 + signal, the parent run is KILLED and no champion is chosen; ``--resume`` then runs
the search to its full trial count (issue 22)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TRIALS = 5

SPACE = f"""
model: demo
search: {{trials: {TRIALS}, seed: 2, max_concurrent: 1, grace_period: 3, cpus_per_trial: 1}}
fixed: {{head: linear, epochs: 3, batch_size: 128, pool: 1, momentum: 0.9}}
params:
  block: {{choice: [7, 10, 13]}}
  t: {{choice: [10, 90]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


def runs(client: MlflowClient, experiment: str, role: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("difftune.role") == role]


def start(tmp_path, address: str, experiment: str, text: str = SPACE
          ) -> tuple[subprocess.Popen, list[str]]:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    common = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--address", address]
    cmd = [sys.executable, "-m", "difftune", "search", "--space", str(space), "--experiment",
           experiment, "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
           *common]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}), common


def after_first_trial(driver: subprocess.Popen, client: MlflowClient, experiment: str) -> None:
    deadline = time.monotonic() + 300
    while not any(r.info.status == "FINISHED" for r in runs(client, experiment, "trial")):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)


def assert_killed_without_champion(client: MlflowClient, experiment: str) -> None:
    (parent,) = runs(client, experiment, "search")
    assert parent.info.status == "KILLED"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(f"difftune-{experiment}", "champion")
    assert "test_top1" not in parent.data.metrics  # no test evaluation of a partial search


def test_ctrl_c_stops_the_search_and_resume_runs_it_to_the_full_count(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    driver, common = start(tmp_path, address, "ctrlc")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        after_first_trial(driver, client, "ctrlc")
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "interrupted (SIGINT) after" in last and f"of {TRIALS} trials" in last, err[-3000:]
    assert "difftune search --resume ctrlc" in last and "Traceback" not in err
    assert_killed_without_champion(client, "ctrlc")
    ran = int(last.split(" after ", 1)[1].split(" of ", 1)[0])
    assert 1 <= ran < TRIALS

    resumed = subprocess.run([sys.executable, "-m", "difftune", "search", "--resume", "ctrlc",
                              *common], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = runs(client, "ctrlc", "trial")
    ids = [r.data.tags["difftune.trial_id"] for r in trials]
    assert len(set(ids)) == TRIALS, [(i, r.info.status) for i, r in zip(ids, trials, strict=True)]
    assert sum(r.info.status == "FINISHED" for r in trials) == TRIALS
    (parent,) = runs(client, "ctrlc", "search")
    assert parent.info.status == "FINISHED"
    assert client.get_model_version_by_alias("difftune-ctrlc", "champion").run_id in {
        r.info.run_id for r in trials}


def test_sigterm_stops_the_search_and_a_second_signal_ends_it_at_once(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    driver, _ = start(tmp_path, address, "term")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        after_first_trial(driver, client, "term")
        driver.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)  # the second: no waiting for a graceful stop
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "interrupted (SIGTERM)" in last and "--resume term" in last, err[-3000:]
    assert "Traceback" not in err
    assert_killed_without_champion(client, "term")


def test_sigterm_during_the_probe_rung_ends_the_search_killed(ray_session, tmp_path):
    """The probe rung runs before the first trial under the same signal handling: SIGTERM
    there ends the search at once (exit 143), its parent run KILLED, no trial started."""
    probed = SPACE.replace("cpus_per_trial: 1}", "cpus_per_trial: 1, image_rungs: [0.05, "
                           "1.0], probe_rung: true}").replace(
        "block: {choice: [7, 10, 13]}", "block: {int: [1, 19]}").replace(
        "t: {choice: [10, 90]}", "t: {int: [0, 500], step: 10}")  # 969 cells: long enough
    driver, _ = start(tmp_path, ray_session.get_runtime_context().gcs_address, "probeterm",
                      probed)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        deadline = time.monotonic() + 120
        while not runs(client, "probeterm", "search"):  # the parent run: the probe is next
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the search never started"
            time.sleep(0.2)
        time.sleep(4)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, err[-3000:]
    assert "probe rung:" in err and "Traceback" not in err, err[-3000:]
    assert "interrupted (SIGTERM)" in err.strip().splitlines()[-1]
    assert_killed_without_champion(client, "probeterm")
    assert runs(client, "probeterm", "trial") == []
