"""The probe rung (search/run/probe.py, search/report/probe_figure.py) on the demo U-Net, the
digits data, a real feature cache and a real sqlite MLflow store: a tiny space (2 blocks x 2
timesteps) gets a complete map whose prefix entries serve the trials' rung 0 without a U-Net
pass; the prior points are the map's top cells; the map, its figure and its cost are on the
parent run, which a second call reads instead of probing again; the Ray task reads what the
local probe wrote."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from difftune.search.report.probe_figure import (
    FIGURE_ARTIFACT,
    MAP_ARTIFACT,
    METRIC,
    TAG,
    best_cells,
    probe_line,
    read_probe_map,
)
from difftune.search.run import probe
from difftune.search.space.spec import load_space
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.data.datasets import load_dataset, targets_of
from difftune.trainables.data.order import rung_rows
from difftune.trainables.params import decode
from difftune.trainables.trainable import RuntimeOptions

BLOCKS, TIMES = (4, 10), (10, 50)
SPACE = {
    "model": "demo", "data": "digits",
    "search": {"trials": 4, "seed": 0, "cache_pool": 2, "image_rungs": [0.05, 1.0],
               "probe_rung": True},
    "fixed": {"epochs": 1},
    "params": {"block": {"choice": list(BLOCKS)}, "t": {"choice": list(TIMES)},
               "pool": {"choice": [1, 2]}, "lr": {"float": [0.001, 0.1], "log": True}},
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The tiny space probed once, in this process, into a fresh cache."""
    root = tmp_path_factory.mktemp("probe")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    space = load_space(str(path))
    runtime = RuntimeOptions(cache=str(root / "cache"), store_pool=2,
                             extra_blocks=space.block_set(), progress_s=0)
    pmap = probe.run_probe(space, runtime, local=True)
    return {"root": root, "space": space, "runtime": runtime, "map": pmap}


def _rows(split: str, fraction: float) -> int:
    ds, _ = load_dataset("digits", split=split, image_size=16)
    return rung_rows(targets_of(ds), fraction, 5)


def test_the_map_holds_every_block_and_timestep(probed):
    pmap = probed["map"]
    assert probe.probe_cells(probed["space"]) == (BLOCKS, TIMES, 2)
    assert sorted((c["block"], c["t"]) for c in pmap["cells"]) == \
        sorted((b, t) for b in BLOCKS for t in TIMES)
    assert all(0 <= c["val_top1"] <= 100 and c["pool"] == 2 for c in pmap["cells"])
    assert pmap["train_rows"] == _rows("train", 0.05) and pmap["val_rows"] == _rows("val", 0.05)
    # the digits are easy: the best cell is far above chance (10%) on ~50 images
    assert best_cells(pmap, 1)[0]["val_top1"] > 50
    # one pass per image of each sample and timestep, every block in it
    assert pmap["unet_images"] == len(TIMES) * (pmap["train_rows"] + pmap["val_rows"])


def test_its_prefix_entries_serve_rung_0_without_a_unet_pass(probed):
    space, runtime, pmap = probed["space"], probed["runtime"], probed["map"]
    cfg = probe.probe_config(space)
    cache = FeatureCache(runtime.cache, store_pool=runtime.store_pool,
                         extra_blocks=runtime.extra_blocks)
    for split in ("train", "val"):  # a trial at rung 0: pool 1 and 2 of both blocks
        feats = cache.get_prefix(cfg, split, [(10, 4, 1), (50, 10, 2), (50, 4, 2)],
                                 pmap[f"{split}_rows"])
        assert len(feats) == pmap[f"{split}_rows"]
    assert cache.unet_images == 0


def test_the_prior_points_are_the_top_cells(probed):
    space, pmap = probed["space"], probed["map"]
    points = probe.prior_points(space, pmap)
    assert len(points) == 2  # startup_trials(4)
    top = [(c["block"], c["t"]) for c in best_cells(pmap, 2)]
    assert [(p["block"], p["t"]) for p in points] == top
    for p in points:  # whole points inside the space, the rest drawn from it
        assert space.point(decode(p)) == p
        assert p["pool"] in (1, 2) and 0.001 <= p["lr"] <= 0.1
    assert probe.prior_points(space, pmap) == points  # seeded


def test_the_map_its_figure_and_cost_are_on_the_parent_run(probed, monkeypatch):
    root, pmap = probed["root"], probed["map"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("probe", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp).info.run_id
    probe.record_probe(client, parent, pmap)
    run = client.get_run(parent)
    assert run.data.metrics[METRIC] == pmap["unet_images"]
    assert read_probe_map(client, parent) == json.loads(json.dumps(pmap))
    png = root / "artifacts" / parent / "artifacts" / FIGURE_ARTIFACT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = probe_line(run.data.tags[TAG], parent)
    best = best_cells(pmap, 1)[0]
    assert f"block {best['block']}, t={best['t']}" in line and MAP_ARTIFACT.replace(
        "/", "%2F") in line
    # --resume: the map on the parent run is read, not probed again
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("probed again"))
    assert probe.probe_rung(probed["space"], probed["runtime"], client=client,
                            parent=parent) == read_probe_map(client, parent)


def test_the_ray_task_reads_the_entries_the_probe_wrote(probed, ray_session):
    again = probe.run_probe(probed["space"], probed["runtime"])  # one Ray task
    assert again["unet_images"] == 0
    got = {(c["block"], c["t"]): c["val_top1"] for c in again["cells"]}
    want = {(c["block"], c["t"]): c["val_top1"] for c in probed["map"]["cells"]}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()))


def test_on_several_workers_the_pool_extracts_and_the_probe_only_reads(probed, ray_session,
                                                                       tmp_path):
    """``extend_on_pool``: the probe's entries extended across a pool of 2 workers (each
    loading the U-Net once) before its task; the probe then passes no image and finds the
    same map as one process extracting alone."""
    from difftune.search.run.extract import WorkerPool, Workers

    runtime = dataclasses.replace(probed["runtime"], cache=str(tmp_path / "cache"))
    with WorkerPool(Workers(2, {"num_cpus": 1}), progress=False) as pool:
        passes = probe.extend_on_pool(probed["space"], runtime, pool)
    want = probed["map"]
    assert passes == want["unet_images"]  # every image of each sample and t, once
    again = probe.run_probe(probed["space"], runtime, local=True)
    assert again["unet_images"] == 0
    got = {(c["block"], c["t"]): c["val_top1"] for c in again["cells"]}
    np.testing.assert_allclose([got[(c["block"], c["t"])] for c in want["cells"]],
                               [c["val_top1"] for c in want["cells"]])
