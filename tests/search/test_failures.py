"""Faults during a search, on a real local Ray: failures a retry would repeat end a trial at
once (a loss that becomes NaN, a configuration error) or the whole search (an image that
cannot be decoded); a transient fault (an I/O error) is retried up to max_failures;
``--resume`` does not rerun the deterministic failures; a search in which no trial finished
exits non-zero; and a tracking server that goes away mid-search and comes back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from helpers import free_port, trial_runs
from mlflow.tracking import MlflowClient
from PIL import Image

from difftune.search.cli import main
from difftune.search.run.trials import OUTBOX, MLflowTrials, store_is_away


def search(tmp_path, space: str, experiment: str, *more: str) -> tuple[int, str]:
    """Run ``difftune search`` in-process; returns its exit code and tracking URI."""
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(space)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["search", "--space", str(path), "--experiment", experiment, "--tracking-uri", uri,
               "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"), *more])
    return rc, uri


def parent_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    (parent,) = [r for r in client.search_runs([exp.experiment_id], max_results=100)
                 if r.data.tags.get("difftune.role") == "search"]
    return parent


def test_diverged_trial_fails_at_once_and_resume_does_not_rerun_it(ray_session, tmp_path):
    rc, uri = search(tmp_path, """
model: demo
search: {trials: 3, seed: 0, max_concurrent: 1, max_failures: 2, grace_period: 1}
fixed: {head: mlp, epochs: 1, block: 10, t: 10, pool: 1, momentum: 0.9}
params:
  lr: {choice: [1.0e+30, 0.05]}
paper_config: {lr: 1.0e+30}
""", "nan")
    assert rc == 0
    client = MlflowClient(uri)
    runs = trial_runs(client, "nan")
    assert len(runs) == 3 and len({r.data.tags["difftune.trial_id"] for r in runs}) == 3
    failed = [r for r in runs if r.info.status == "FAILED"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert failed and finished
    for r in failed:
        assert r.data.tags["failure"] == "diverged"
        assert "loss became nan" in r.data.tags["error"] or "loss became inf" in \
            r.data.tags["error"]
        assert r.data.tags["failures"] == "1" and "last_failure" not in r.data.tags  # no retry
        assert r.data.params["lr"] == "1e+30"
        assert "val_top1" not in r.data.metrics  # a diverged epoch is no score
    version = client.get_model_version_by_alias("difftune-nan", "champion")
    assert version.run_id in {r.info.run_id for r in finished}
    ended = {r.info.run_id: r.info.end_time for r in failed}

    # as if the driver had died after the trials ended: --resume restores the search from
    # Ray Tune's state, and the diverged trial (ended, not errored) is not run again
    client.update_run(parent_run(client, "nan").info.run_id, status="RUNNING")
    assert main(["search", "--resume", "nan", "--tracking-uri", uri]) == 0
    again = {r.info.run_id: r for r in trial_runs(client, "nan")}
    assert len(again) == 3
    for run_id, end in ended.items():  # the diverged trial was not run again
        assert again[run_id].info.end_time == end and again[run_id].info.status == "FAILED"


def test_config_error_is_not_retried_and_no_finished_trial_exits_1(ray_session, tmp_path,
                                                                    capsys):
    rc, uri = search(tmp_path, """
model: demo
search: {trials: 2, seed: 0, max_concurrent: 1, max_failures: 2}
fixed: {head: attention, epochs: 1, block: 10, t: 10, pre_pool: 4, depth: 1}
params:
  dim: {choice: [30]}
  heads: {choice: [4]}
""", "cfg")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "no trial finished" in err[-1] and "2 config" in err[-1]
    client = MlflowClient(uri)
    runs = trial_runs(client, "cfg")
    assert len(runs) == 2
    for r in runs:
        assert r.info.status == "FAILED" and r.data.tags["failure"] == "config"
        assert "dim=30 must be a positive multiple of heads=4" in r.data.tags["error"]
        assert "last_failure" not in r.data.tags
    parent = parent_run(client, "cfg")
    assert parent.info.status == "FAILED"
    assert "no trial finished" in parent.data.tags["difftune.failure"]
    assert client.search_registered_models() == []


def image_tree(root, *, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for folder, n in (("train", per_class), ("val", 3)):
        for c in ("a", "b"):
            (root / folder / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                pixels[:, :, 0] = 255 if c == "a" else 0  # a learnable class signal
                Image.fromarray(pixels).save(root / folder / c / f"{c}{i}.png")


FOLDER_SPACE = """
model: demo
search: {trials: 2, seed: 0, max_concurrent: 1, max_failures: 1}
fixed: {head: linear, epochs: 1, block: 4, t: 10, pool: 1, batch_size: 8}
params:
  lr: {float: [0.01, 0.1], log: true}
"""


def test_a_corrupt_image_stops_the_search_with_one_line(ray_session, tmp_path, capsys):
    data = tmp_path / "data"
    image_tree(data)
    bad = data / "train" / "b" / "b3.png"
    bad.write_bytes(np.random.default_rng(1).bytes(500))  # random bytes named .png
    rc, uri = search(tmp_path, FOLDER_SPACE, "corrupt", "--data", str(data))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert str(bad) in err[-1] and err[-1].startswith("difftune search: error: image")
    client = MlflowClient(uri)
    (run,) = trial_runs(client, "corrupt")  # the search stopped at the first trial
    assert run.data.tags["failure"] == "data" and "last_failure" not in run.data.tags
    parent = parent_run(client, "corrupt")
    assert parent.info.status == "FAILED" and str(bad) in parent.data.tags["difftune.failure"]

    skipping = FOLDER_SPACE.replace("model: demo", "model: demo\nbad_images: skip")
    rc, _ = search(tmp_path, skipping, "skip", "--data", str(data))
    assert rc == 0
    parent = parent_run(client, "skip")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["bad_images_skipped"] == 1 and "test_top1" in parent.data.metrics
    listed = client.download_artifacts(parent.info.run_id, "bad_images.txt", str(tmp_path))
    assert open(listed).read().split() == [str(bad)]
    assert all(r.info.status == "FINISHED" for r in trial_runs(client, "skip"))


def test_an_io_error_is_retried_up_to_max_failures(ray_session, tmp_path, capsys):
    data = tmp_path / "data"
    image_tree(data)
    (data / "train" / "a" / "a9.png").symlink_to(tmp_path / "gone.png")  # unreadable file
    space = FOLDER_SPACE.replace("trials: 2", "trials: 1")
    rc, uri = search(tmp_path, space, "io", "--data", str(data))
    assert rc == 1 and "no trial finished" in capsys.readouterr().err
    (run,) = trial_runs(MlflowClient(uri), "io")
    assert run.info.status == "FAILED" and run.data.tags["failure"] == "error"
    assert run.data.tags["failures"] == "2"  # failed, retried once (max_failures: 1), failed
    assert "a9.png" in run.data.tags["last_failure"] and "a9.png" in run.data.tags["error"]


class Trial:
    """What the callback reads of a Tune trial (Tune hands it a ray.tune Trial)."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config
        self.last_result, self.num_failures, self.error_file = {}, 0, None

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


def test_a_refused_record_fails_alone_and_later_records_go_on(tmp_path, caplog):
    """HTTP 4xx (here: a parameter name MLflow refuses) is that record's fault: one line, and
    the records after it, of that trial and of others, are written."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("refused", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"difftune.role": "search"}).info.run_id
    callback = MLflowTrials(uri, parent, outbox_dir=str(tmp_path / "exp"))
    bad, good = Trial("a", {"head": "linear", "bad name?": 1}), Trial("b", {"head": "mlp"})
    with caplog.at_level(logging.ERROR, logger="difftune.search.run.trials"):
        for trial in (bad, good):
            callback.on_trial_start(0, [], trial)
        for trial in (bad, good):
            callback.on_trial_result(0, [], trial, {"epoch": 1, "val_top1": 50.0})
            callback.on_trial_complete(0, [], trial)
    refused = [r.getMessage() for r in caplog.records]
    assert len(refused) == 1 and "trial a (start, HTTP 400" in refused[0] and "\n" not in refused[0]
    assert "INVALID_PARAMETER_VALUE" in refused[0]
    assert callback.flush() and not callback._outbox
    runs = {r.data.tags["difftune.trial_id"]: r for r in trial_runs(client, "refused")}
    assert set(runs) == {"a", "b"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert all(r.data.metrics["val_top1"] == 50.0 for r in runs.values())
    assert not (tmp_path / "exp" / OUTBOX).exists()


def test_a_resumed_search_closes_the_runs_its_dead_driver_left_open(tmp_path):
    """Tune saved a trial as ended, the driver died before sending its last records: the
    resumed driver (a callback restored from tuner.pkl) sends its last epoch and its end;
    a run recorded in full is left as it is."""
    import pickle

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("settle", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"difftune.role": "search"}).info.run_id
    first = MLflowTrials(uri, parent)
    saved = pickle.dumps(first)  # as Tune's tuner.pkl holds it
    cut, done = Trial("cut", {"head": "linear", "epochs": 2}), Trial("done", {"epochs": 2})
    for trial in (cut, done):
        first.on_trial_start(0, [], trial)
        first.on_trial_result(0, [], trial, {"epoch": 1, "val_top1": 40.0})
    first.on_trial_result(0, [], done, {"epoch": 2, "val_top1": 60.0})
    first.on_trial_complete(0, [], done)  # ... and the driver dies before cut's last epoch
    runs = {r.data.tags["difftune.trial_id"]: r for r in trial_runs(client, "settle")}
    assert runs["cut"].info.status == "RUNNING"
    finished_at = runs["done"].info.end_time

    resumed = pickle.loads(saved)
    for trial, value in ((cut, 55.0), (done, 60.0)):
        trial.status, trial.last_result = "TERMINATED", {"epoch": 2, "val_top1": value}
    resumed.on_experiment_end([cut, done])
    runs = {r.data.tags["difftune.trial_id"]: r for r in trial_runs(client, "settle")}
    assert runs["cut"].info.status == "FINISHED"
    history = client.get_metric_history(runs["cut"].info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 40.0), (2, 55.0)]
    assert runs["cut"].data.metrics["final_val_top1"] == 55.0
    assert runs["cut"].data.tags["early_stopped"] == "false"
    assert runs["done"].info.end_time == finished_at  # left as it is


def test_only_an_absent_store_makes_records_wait():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    assert store_is_away(MlflowException("API request to http://h/api failed with exception "
                                          "HTTPConnectionPool: Max retries exceeded"))
    assert store_is_away(MlflowException("API request to endpoint /api failed with error code "
                                          "503 != 200. Response body: ''"))
    assert store_is_away(requests.exceptions.ConnectionError("refused"))
    assert store_is_away(ConnectionResetError(104, "reset"))
    assert store_is_away(RestException({"error_code": "INTERNAL_ERROR", "message": "db"}))
    assert not store_is_away(RestException({"error_code": "PERMISSION_DENIED", "message": "no"}))
    assert not store_is_away(RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                            "message": "bad"}))
    assert not store_is_away(MlflowException("API request to endpoint /api failed with error "
                                             "code 403 != 200. Response body: 'Forbidden'"))
    assert not store_is_away(ValueError("a value MLflow cannot take"))


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


#: the searches of the tracking-server outage tests: linear heads, one trial at a time
OUTAGE_SPACE = """
model: demo
search: {{trials: {trials}, seed: {seed}, max_concurrent: 1, grace_period: 2}}
fixed: {{head: linear, epochs: 2, pool: 1, momentum: 0.9, batch_size: 128}}
params:
  block: {{choice: [7, 10, 13]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


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
    space.write_text(OUTAGE_SPACE.format(trials=4, seed=1))
    search = subprocess.Popen(
        [sys.executable, "-m", "difftune", "search", "--space", str(space), "--experiment",
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


def test_driver_killed_during_an_outage_loses_no_record_after_resume(ray_session, tmp_path):
    """Records that wait for the tracking server are kept beside the Tune experiment: the
    driver is killed while they wait, the server comes back, and --resume sends them."""
    port = free_port()
    server = start_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    space = tmp_path / "s.yaml"
    space.write_text(OUTAGE_SPACE.format(trials=3, seed=2))
    common = ["--tracking-uri", uri, "--address", ray_session.get_runtime_context().gcs_address]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "difftune", "search", "--space", str(space),
         "--experiment", "outbox", "--storage", str(tmp_path / "runs"),
         "--cache", str(tmp_path / "cache"), *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = MlflowClient(uri)
    try:
        deadline = time.monotonic() + 300
        while not trial_runs(client, "outbox"):  # the first trial is recorded
            assert driver.poll() is None and time.monotonic() < deadline, "no trial started"
            time.sleep(0.5)
        stop(server)  # the server goes away while trials run
        waiting: list = []
        while not any(r["op"] == "complete" for r in waiting):  # a trial finished meanwhile
            assert driver.poll() is None and time.monotonic() < deadline, "no trial finished"
            time.sleep(0.5)
            kept = list((tmp_path / "runs").glob(f"*/{OUTBOX}"))
            try:
                waiting = json.loads(kept[0].read_text())["records"] if kept else []
            except ValueError:
                waiting = []
        time.sleep(2)  # Tune saves its experiment state every second
    finally:
        driver.kill()  # SIGKILL: nothing is flushed on the way out
        driver.wait()
    finished_then = {r["trial"] for r in waiting if r["op"] == "complete"}
    server = start_server(tmp_path, port)
    try:
        resumed = subprocess.run([sys.executable, "-m", "difftune", "search",
                                  "--resume", "outbox", *common], capture_output=True,
                                 text=True, timeout=600, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        every = {r.data.tags["difftune.trial_id"]: r for r in trial_runs(client, "outbox")}
        # a trial that started after Tune last saved its state (under load, within the
        # seconds before the kill) is unknown to the restored search: its run is closed as
        # KILLED by --resume, and the search runs the trial count without it
        runs = {k: r for k, r in every.items() if r.info.status != "KILLED"}
        assert len(runs) == 3 and finished_then <= set(runs), \
            {k: r.info.status for k, r in every.items()}
        assert len(every) <= 4
        for r in runs.values():
            assert r.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")]
            assert steps == [1, 2]  # each epoch once, none lost
        assert not list((tmp_path / "runs").glob(f"*/{OUTBOX}"))
        assert client.get_model_version_by_alias("difftune-outbox", "champion")
    finally:
        stop(server)
