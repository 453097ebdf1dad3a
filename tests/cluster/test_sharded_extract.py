"""Extraction across a real 2-node Ray cluster (processes on this machine): ``difftune
extract --space`` shards each entry over both nodes, records the node of every part, and the
entry reads back row for row as the same entry extracted unsharded; a node killed
mid-extraction still leaves a complete entry (its shard is rerun on the other node)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difftune.trainables.cache.entry import MappedEntry
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.config import TrialConfig

pytestmark = pytest.mark.slow

SPACE = """model: demo
data: digits
label_fraction: {lf}
search: {{trials: 2, seed: 0, max_concurrent: 1, cpus_per_trial: 1, cache_pool: 2}}
fixed: {{head: linear, epochs: 1, batch_size: 64, optimizer: sgd}}
params:
  block: {{choice: [4, 10]}}
  t: {{choice: [{t}]}}
  pool: {{choice: [1, 2]}}
  lr: {{float: [0.001, 0.1], log: true}}
"""


def extract(two_nodes, tmp_path: Path, t: int, batch: int, lf: float = 0.3
            ) -> subprocess.Popen:
    space = tmp_path / f"space{t}.yaml"
    space.write_text(SPACE.format(t=t, lf=lf))
    log = open(tmp_path / f"extract{t}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "difftune", "extract", "--space",
                             str(space), "--address", two_nodes.address, "--cache",
                             str(tmp_path / "cache"), "--batch", str(batch)],
                            env=two_nodes.env, stdout=log, stderr=subprocess.STDOUT)


def manifests(root: Path, t: int) -> dict[tuple[str, int], dict]:
    out = {}
    for f in root.rglob(f"t{t}-*/b*-p2-float16.json"):
        m = json.loads(f.read_text())
        out[(m["key"]["split"], m["key"]["block"])] = {**m, "dir": f.parent}
    return out


def same_as_unsharded(tmp_path: Path, found: dict, t: int, batch: int, lf: float = 0.3
                      ) -> None:
    ref = FeatureCache(str(tmp_path / "plain"), batch_size=batch)
    cfg = TrialConfig(label_fraction=lf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray task: the float sums in the same order
    try:
        plain = {split: ref.get(cfg, split, [(t, 4, 2), (t, 10, 2)])
                 for split in ("train", "val")}
    finally:
        torch.set_num_threads(threads)
    for split in ("train", "val"):
        for block in (4, 10):
            m = found[(split, block)]
            got = MappedEntry(tuple(str(m["dir"] / p["file"]) for p in m["parts"]))
            want = plain[split].maps()[(t, block)]
            assert got.meta["key"] == want.meta["key"]
            for i in (0, 1):
                np.testing.assert_array_equal(got.column(i), want.column(i))
            n = int(want.offsets[-1])
            np.testing.assert_array_equal(got.take(np.arange(n)), want.take(np.arange(n)))


def test_an_entry_extracted_in_two_shards_lands_on_both_nodes(two_nodes, tmp_path):
    proc = extract(two_nodes, tmp_path, 30, 64)
    assert proc.wait(timeout=600) == 0, (tmp_path / "extract30.log").read_text()[-4000:]
    log = (tmp_path / "extract30.log").read_text()
    assert "2 CPU worker(s)" in log and "img/s" in log
    found = manifests(tmp_path / "cache", 30)
    assert sorted(found) == [("train", 4), ("train", 10), ("val", 4), ("val", 10)]
    train = found[("train", 10)]
    assert [p["shard"] for p in train["parts"]] == [0, 1]
    assert {p["node"] for p in train["parts"]} == set(two_nodes.node_ids.values())
    same_as_unsharded(tmp_path, found, 30, 64)


def test_a_search_extracts_its_planned_entries_on_both_nodes_before_its_trials(two_nodes,
                                                                               tmp_path):
    """``difftune search`` on the 2-node cluster (one timestep, 2 trials: the trials may ask
    every timestep) extracts the plan's entries as shards on both nodes first; its trials then
    only read them (``unet_images`` 0 each)."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(t=70, lf=0.3))
    out = subprocess.run(
        [sys.executable, "-m", "difftune", "search", "--space", str(space),
         "--address", two_nodes.address, "--cache", str(tmp_path / "cache"),
         "--storage", str(tmp_path / "runs"), "--experiment", "extract-first",
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env={**two_nodes.env, "DIFFTUNE_SHARED_PATHS": str(tmp_path)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "extracting the plan's entries first on 2 CPU worker(s)" in out.stdout
    found = manifests(tmp_path / "cache", 70)
    assert {("train", 4), ("train", 10), ("val", 4), ("val", 10)} <= set(found)
    assert {p["node"] for p in found[("train", 10)]["parts"]} == \
        set(two_nodes.node_ids.values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("extract-first")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("difftune.role") == "trial"]
    assert len(trials) == 2
    assert [r.data.metrics["unet_images"] for r in trials] == [0, 0]


def test_killing_a_node_mid_extraction_still_publishes_a_complete_entry(two_nodes, tmp_path):
    # all train labels in batches of 1: each shard runs long enough that the worker's shard
    # is under way before the head's has finished, even when the worker starts late
    proc = extract(two_nodes, tmp_path, 50, 1, lf=1.0)
    deadline = time.monotonic() + 300
    while len({f.name.split(".part")[1][:4]  # shards with a part being written
                for f in (tmp_path / "cache").rglob("t50-*/*.part*.tmp")}) < 2:
        assert proc.poll() is None, (tmp_path / "extract50.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the two shards never both started"
        time.sleep(0.1)
    two_nodes.procs.kill_tree("worker")  # a node losing power mid-shard
    assert proc.wait(timeout=600) == 0, (tmp_path / "extract50.log").read_text()[-4000:]
    found = manifests(tmp_path / "cache", 50)
    assert sorted(found) == [("train", 4), ("train", 10), ("val", 4), ("val", 10)]
    train = found[("train", 4)]
    assert [p["shard"] for p in train["parts"]] == [0, 1]
    # the shard on the killed node was rerun (on the head, unless it was already done), and
    # everything after the kill ran on the head
    assert {p["node"] for p in train["parts"]} <= set(two_nodes.node_ids.values())
    assert {p["node"] for p in found[("val", 4)]["parts"]} == {two_nodes.node_ids["head"]}
    same_as_unsharded(tmp_path, found, 50, 1, lf=1.0)
