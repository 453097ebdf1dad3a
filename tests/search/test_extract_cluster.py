"""Extraction across a local Ray through a pool of workers that stay (search/run/extract.py:
``WorkerPool``, one actor per worker): one work list over splits and timesteps reads back
row for row as the same entries extracted in one process, each worker loading the U-Net once
across timesteps, splits and rungs; progress comes as lines on the search's console; prefix
entries extended through the pool pass only their new rows; a lost worker's shards go to
the others."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from difftune.search.run.extract import WorkerPool, Workers, extract_prefixes
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import extract_groups
from difftune.trainables.config import TrialConfig

CFG = TrialConfig(label_fraction=0.05)  # 51 train images; val is all 359 of the holdout
REQUESTS = [(30, 2, 2), (70, 2, 2), (70, 4, 2)]  # shallow blocks: short passes
KEYS = [(30, 2), (70, 2), (70, 4)]
BATCH = 16


@pytest.fixture(scope="module")
def pool(ray_session):
    """Two 1-CPU workers, kept across this module's tests (as across a search)."""
    with WorkerPool(Workers(2, {"num_cpus": 1}), progress=False, lines_s=0) as p:
        yield p


@pytest.fixture
def one_thread():
    """This process's U-Net as a 1-CPU worker's: the float sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_rows(ref, got, keys) -> None:
    for key in keys:
        a, b = ref.maps()[key], got.maps()[key]
        n = len(ref)
        assert len(got) == n
        np.testing.assert_array_equal(a.column(0)[:n], b.column(0)[:n])
        np.testing.assert_array_equal(a.column(1)[:n], b.column(1)[:n])
        np.testing.assert_array_equal(a.take(np.arange(n)), b.take(np.arange(n)))


def test_a_work_list_on_the_pool_reads_back_as_one_process_and_each_worker_loads_once(
        pool, tmp_path, caplog, one_thread):
    cache = FeatureCache(str(tmp_path / "cache"), batch_size=BATCH, precision="fp32")
    with caplog.at_level(logging.INFO, logger="difftune"):
        counts = extract_groups(cache, CFG, ("train", "val"), REQUESTS, shards=2,
                                runner=pool.runner)
    assert counts["written"] == 6 and counts["images"] == 2 * (51 + 359)
    # one work list of 8 shards; each worker ran its share of both timesteps and splits
    # with the U-Net it loaded once, on one thread (its CPU)
    stats = pool.stats()
    assert [s["loads"] for s in stats] == [1, 1], stats
    assert sorted(s["jobs"] for s in stats) == [4, 4] and {s["threads"] for s in stats} == {1}
    lines = [r.getMessage() for r in caplog.records
             if r.name == "difftune.trainables.progress"]
    assert lines and all(line.startswith("extract train+val t=30,70 [8 shards]")
                         for line in lines), lines
    assert f"{counts['images']:,} images in" in lines[-1] and "img/s" in lines[-1], lines
    plain = FeatureCache(str(tmp_path / "plain"), batch_size=BATCH, precision="fp32")
    for split in ("train", "val"):
        got = cache.get(CFG, split, REQUESTS)
        assert all(len(got.entries[k][0]) == 2 for k in KEYS)  # two parts: two shards
        same_rows(plain.get(CFG, split, REQUESTS), got, KEYS)
    assert cache.stats.forward_images == 0


def test_prefix_entries_extended_through_the_pool_pass_only_their_new_rows(pool, tmp_path,
                                                                           one_thread):
    root = str(tmp_path / "cache")
    kw = {"batch_size": BATCH, "store_pool": 2}
    first = extract_prefixes(CFG, REQUESTS, {"train": 20, "val": 24}, cache=root, pool=pool,
                             **kw)
    assert first["images"] == 2 * (20 + 24) and first["units"] == 4  # (train, val) x 2 t
    more = extract_prefixes(CFG, REQUESTS, {"train": 40, "val": 48}, cache=root, pool=pool,
                            **kw)
    assert more["images"] == 2 * (20 + 24)  # the new rows only
    again = extract_prefixes(CFG, REQUESTS, {"train": 40, "val": 48}, cache=root, pool=pool,
                             **kw)
    assert again["images"] == 0 and again["written"] == 0
    assert [s["loads"] for s in pool.stats()] == [1, 1]  # timesteps, splits, rungs: once
    # a trial of the rung reads them without a pass, as a one-process extension stores them
    reader, ref = FeatureCache(root, **kw), FeatureCache(str(tmp_path / "ref"), **kw)
    for split, n in (("train", 40), ("val", 48)):
        ref.get_prefix(CFG, split, REQUESTS, n // 2)
        same_rows(ref.get_prefix(CFG, split, REQUESTS, n),
                  reader.get_prefix(CFG, split, REQUESTS, n), KEYS)
    assert reader.unet_images == 0


def test_a_lost_worker_s_shards_go_to_the_others(ray_session, tmp_path):
    import ray

    cache = FeatureCache(str(tmp_path / "cache"), batch_size=BATCH, precision="fp32")
    # no CPUs asked: the module's pool holds both of this Ray's
    with WorkerPool(Workers(2, {"num_cpus": 0}), progress=False) as two:
        ray.kill(two.actors[1])  # its node lost before its first shard
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(two.actors[1].progress.remote(), timeout=120)
        counts = extract_groups(cache, CFG, ("train",), REQUESTS[:2], shards=2,
                                runner=two.runner)
        assert counts["written"] == 2 and counts["images"] == 2 * 51
        assert two.alive == two.actors[:1]
        assert two.stats()[0]["jobs"] == 4  # its own two shards and the lost worker's
    got = cache.get(CFG, "train", REQUESTS[:2])
    assert cache.stats.forward_images == 0 and len(got) == 51
