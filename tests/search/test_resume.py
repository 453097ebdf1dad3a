"""A real driver killed with SIGKILL mid-search, then `difftune search --resume`: finished
trials keep their single MLflow run untouched, the search ends with every trial recorded
exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

TRIALS = 4
EPOCHS = 3

SPACE = f"""
model: demo
data: digits
search: {{trials: {TRIALS}, seed: 3, max_concurrent: 1, grace_period: {EPOCHS},
          cpus_per_trial: 1, max_failures: 1, cache_pool: 2}}
fixed: {{head: linear, epochs: {EPOCHS}, batch_size: 128, pool: 1, momentum: 0.9}}
params:
  block: {{choice: [7, 10, 13]}}
  t: {{choice: [10, 90]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


def children(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("difftune.role") == "trial"]


def test_resume_after_sigkill_records_every_trial_once(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--tracking-uri", uri, "--address", address]
    cmd = [sys.executable, "-m", "difftune", "search", "--space", str(space),
           "--experiment", "resume", "--storage", str(tmp_path / "runs"),
           "--cache", str(tmp_path / "cache"), *common]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            done = [r for r in children(client, "resume") if r.info.status == "FINISHED"]
            if len(done) >= 2:
                break
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(1)
        else:
            pytest.fail("two trials did not finish in time")
        time.sleep(2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = {r.info.run_id: r for r in children(client, "resume")
              if r.info.status == "FINISHED"}
    histories = {rid: [(m.step, m.value) for m in client.get_metric_history(rid, "val_top1")]
                 for rid in before}
    assert len(before) >= 2

    resumed = subprocess.run([sys.executable, "-m", "difftune", "search", "--resume", "resume",
                              *common], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    after = children(client, "resume")
    trial_ids = [r.data.tags["difftune.trial_id"] for r in after]
    assert len(after) == TRIALS and len(set(trial_ids)) == TRIALS
    assert all(r.info.status == "FINISHED" for r in after), (
        [(r.data.tags["difftune.trial_id"], r.info.status) for r in after],
        resumed.stderr[-4000:])
    for rid, history in histories.items():  # finished runs: neither duplicated nor overwritten
        assert [(m.step, m.value) for m in client.get_metric_history(rid, "val_top1")] == history
    for r in after:  # every run has each epoch once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")]
        assert steps == sorted(set(steps)) and steps[-1] == EPOCHS
    (parent,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], max_results=100)
        if r.data.tags.get("difftune.role") == "search"]
    assert parent.info.status == "FINISHED"
    assert client.get_model_version_by_alias("difftune-resume", "champion").run_id in {
        r.info.run_id for r in after}
    # the resumed search continued the same Optuna study: one study, every trial told once
    import optuna

    storage = optuna.storages.RDBStorage(parent.data.tags["difftune.optuna_storage"])
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name == parent.data.tags["difftune.optuna_study"]
    states = [t.state.name for t in optuna.load_study(study_name=summary.study_name,
                                                      storage=storage).trials]
    assert states.count("COMPLETE") == TRIALS and "RUNNING" not in states


def test_resume_of_unknown_experiment_is_one_clear_error(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # an existing store without that experiment
    r = subprocess.run([sys.executable, "-m", "difftune", "search", "--resume", "nope",
                        "--tracking-uri", uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume 'nope': no such experiment" in lines[0]
    missing = subprocess.run([sys.executable, "-m", "difftune", "search", "--resume", "x",
                              "--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "there is no MLflow store" in missing.stderr
    assert not (tmp_path / "none.db").exists()
