"""Rungs over images in a real search (``search: image_rungs``): Ray Tune's ASHA decides at
the rungs' ends, every trial stops at the end of a rung, the closing table and the runs say
where each stopped, the champion comes from the last rung; a search killed (SIGKILL) between
rungs resumes without passing a rung's images through the U-Net again; a wrong setting is one
line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import trial_runs
from mlflow.tracking import MlflowClient

from difftune.search.space.checks import SpaceError
from difftune.search.space.spec import load_space
from difftune.trainables.cache.admin import list_entries
from difftune.trainables.data.order import ORDER

EPOCHS = 2
RUNGS = [0.05, 0.3, 1.0]


def space_text(trials: int, *, concurrent: int = 2, epochs: int = EPOCHS) -> str:
    return f"""
model: demo
data: digits
search: {{trials: {trials}, seed: 1, max_concurrent: {concurrent}, reduction_factor: 2,
          cpus_per_trial: 1, max_failures: 1, cache_pool: 2, image_rungs: {RUNGS}}}
fixed: {{head: linear, epochs: {epochs}, batch_size: 32, pool: 1, momentum: 0.9}}
params:
  block: {{choice: [3, 10, 13]}}
  t: {{choice: [10, 200]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


def search(ray_session, tmp_path: Path, space: Path, experiment: str
           ) -> subprocess.CompletedProcess:
    """``difftune search`` of ``space`` in ``tmp_path`` on the test session's Ray."""
    return subprocess.run(
        [sys.executable, "-m", "difftune", "search", "--space", str(space), "--experiment",
         experiment, "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--address",
         ray_session.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=600)


def test_search_with_rungs_decides_at_rung_ends(ray_session, tmp_path):
    """A search with rungs and the probe rung (``probe_rung: true``): ASHA stops trials only
    at rung ends, the champion saw every image; the probe's map is on the parent run before
    the first trial, the first trials are its best cells, and no trial pays a U-Net pass at
    rung 0 (the probe's prefix entries serve it)."""
    raw = yaml.safe_load(space_text(6))
    raw["search"]["probe_rung"] = True
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = search(ray_session, tmp_path, space, "rungs")
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(uri)
    runs = trial_runs(client, "rungs")
    assert len(runs) == 6
    reached = sorted(int(x.data.metrics["image_rung"]) for x in runs)
    assert reached[-1] == len(RUNGS) - 1  # some trial saw every image
    assert reached[0] < len(RUNGS) - 1, reached  # ASHA stopped some trial at an earlier rung
    for x in runs:
        # ASHA decides only at a rung's end: no trial stops inside a rung
        assert x.data.metrics["epoch"] == EPOCHS
        assert x.data.tags["early_stopped"] == str(x.data.metrics["image_rung"] < 2).lower()
        steps = [m.step for m in client.get_metric_history(x.info.run_id, "val_top1")]
        assert steps == list(range(1, EPOCHS * (int(x.data.metrics["image_rung"]) + 1) + 1))
    # the closing table says where each trial stopped; the champion saw every image
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("val_top1"))
    assert "rung" in header.split() and "images" in header.split() and "epochs" not in header
    champion = client.get_model_version_by_alias("difftune-rungs", "champion").run_id
    (best,) = [x for x in runs if x.info.run_id == champion]
    assert best.data.metrics["image_rung"] == len(RUNGS) - 1
    assert best.data.metrics["rung_images"] == 1078  # every digits training image
    # the probe rung: every cell mapped on rung 0's sample, its best cells tried first,
    # its entries read by every trial's rung 0
    from difftune.search.report.probe_figure import best_cells, read_probe_map

    exp = client.get_experiment_by_name("rungs")
    (parent,) = [x for x in client.search_runs([exp.experiment_id])
                 if x.data.tags.get("difftune.role") == "search"]
    pmap = read_probe_map(client, parent.info.run_id)
    assert {(c["block"], c["t"]) for c in pmap["cells"]} == {
        (b, t) for b in (3, 10, 13) for t in (10, 200)}
    assert parent.data.metrics["probe_unet_images"] == 2 * (54 + 50)  # 2 t x rung 0's rows
    first = sorted(runs, key=lambda x: x.info.start_time)[:2]  # startup_trials(6) == 2
    assert {(json.loads(x.data.tags["difftune.config"])["block"],
             json.loads(x.data.tags["difftune.config"])["t"]) for x in first} == {
        (c["block"], c["t"]) for c in best_cells(pmap, 2)}
    for x in runs:
        history = client.get_metric_history(x.info.run_id, "unet_images")
        assert [m.value for m in history if m.step <= EPOCHS] == [0] * EPOCHS
    # train and val only in prefix entries (the last rung extended them to every image; no
    # whole-split entry), each holding the rows of the deepest rung read at its timestep;
    # test (the champion's one evaluation) as a whole split
    entries = list_entries(str(tmp_path / "cache"))
    assert {(e["split"], e["order"]) for e in entries} == {
        ("train", ORDER), ("val", ORDER), ("test", "")}
    deepest = {}
    for x in runs:
        t = int(json.loads(x.data.tags["difftune.config"])["t"])
        deepest[t] = max(deepest.get(t, 0), x.data.metrics["rung_images"])
    train = [e for e in entries if e["split"] == "train"]
    sizes = {54, 324, 1078}  # the rungs' train samples (0.05 and 0.3 at >= 5 per class)
    for t, rows in deepest.items():  # an entry holds a rung's sample, at most the deepest
        held = [e["rows"] for e in train if e["t"] == t]
        assert set(held) <= sizes and max(held) == rows, (t, held, deepest)


def tune_results(storage: Path) -> list[dict]:
    out = []
    for f in storage.rglob("result.json"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_search_killed_between_rungs_resumes_without_extracting_a_rung_again(ray_session,
                                                                            tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(space_text(1, concurrent=1, epochs=20))  # rungs long enough to kill in
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--tracking-uri", uri, "--address", ray_session.get_runtime_context().gcs_address]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "difftune", "search", "--space", str(space), "--experiment",
         "between", "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
         *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    try:  # killed as soon as the trial is past its first rung
        while time.monotonic() < deadline:
            if any(x.get("image_rung", 0) >= 1 for x in tune_results(tmp_path / "runs")):
                break
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("the trial did not reach its second rung in time")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = tune_results(tmp_path / "runs")
    resumed = subprocess.run([sys.executable, "-m", "difftune", "search", "--resume",
                              "between", *common], capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = tune_results(tmp_path / "runs")
    assert results[-1]["image_rung"] == len(RUNGS) - 1
    # every process the trial ran in counted its own U-Net passes: together they are the
    # train + val images of the last rung, once (1 timestep): no rung was extracted twice
    last_by_pid: dict[int, int] = {}
    for x in results:
        last_by_pid[x["pid"]] = x["unet_images"]
    assert len(last_by_pid) == 2 and len(results) > len(before), (last_by_pid, len(before))
    # (whether Tune restored the trial from its checkpoint or started it over, the passes of
    # the rungs already done are not paid again: the cache's prefix entries hold them)
    assert sum(last_by_pid.values()) == 1078 + 359, (last_by_pid, len(before))
    (run,) = trial_runs(MlflowClient(uri), "between")
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("value, fragment", [
    ([0.1, 0.5], "ending at 1.0"),
    ([0.5, 0.1, 1.0], "increasing"),
    ([0, 1.0], "in (0, 1]"),
    ("half", "increasing fractions"),
])
def test_a_wrong_image_rungs_is_one_line(tmp_path, value, fragment):
    raw = yaml.safe_load(space_text(2))
    raw["search"]["image_rungs"] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError) as e:
        load_space(str(path))
    message = str(e.value)
    assert "\n" not in message and "search.image_rungs" in message and fragment in message
    raw["search"].update(image_rungs=RUNGS, image_floor=0)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match="search.image_floor=0 is invalid"):
        load_space(str(path))
    raw["search"].update(image_floor=5, rung_steps=0)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match=r"search.rung_steps=0 is invalid; allowed: an int"):
        load_space(str(path))


def test_image_rungs_flag_is_checked_and_overrides_the_space(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "difftune", "search", "--image-rungs", "0.5"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert "--image-rungs" in line and "ending at 1" in line
    assert not list(tmp_path.iterdir())  # nothing written
    path = tmp_path / "space.yaml"
    path.write_text(space_text(2))
    assert load_space(str(path)).search["image_rungs"] == RUNGS
    off = load_space(str(path), search_overrides={"image_rungs": []})
    assert off.search["image_rungs"] is None
    on = load_space("demo", search_overrides={"image_rungs": [0.1, 1.0]})
    assert on.search["image_rungs"] == [0.1, 1.0]

