"""Sharded cache entries (trainables/cache/shard.py, parts.py) without Ray: shards in this
process read back row for row as the unsharded entry; one work list over several splits and
timesteps, run by one worker that keeps its model, publishes each group as soon as its last
part is in; a half-written part is never read and an entry without all its parts is not
visible; what a failed extraction left is swept."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from difftune.trainables.cache import throughput
from difftune.trainables.cache.admin import remove
from difftune.trainables.cache.entry import MappedEntry
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.parts import PART_NAME
from difftune.trainables.cache.policy import usage
from difftune.trainables.cache.shard import (
    ShardWorker,
    extract_groups,
    extract_sharded,
    local_runner,
    run_shard,
    shard_ranges,
)
from difftune.trainables.config import TrialConfig

CFG = TrialConfig(label_fraction=0.05)  # 51 digits training images: shards of 32 and 19
REQUESTS = [(30, 4, 2), (30, 10, 2)]
BATCH = 16


def rows(features, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = features.maps()[key]
    return m.column(0), m.column(1), m.take(np.arange(len(features)))


def test_shard_ranges_are_contiguous_batch_aligned_and_cover_everything():
    assert shard_ranges(71, 2, 16) == [(0, 48), (48, 71)]
    assert shard_ranges(71, 8, 16) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 71)]
    assert shard_ranges(10, 3, 16) == [(0, 10)]


def test_two_shards_read_back_identical_to_the_unsharded_entry(tmp_path):
    plain = FeatureCache(str(tmp_path / "plain"), batch_size=BATCH)
    ref = plain.get(CFG, "train", REQUESTS)
    sharded = FeatureCache(str(tmp_path / "sharded"), batch_size=BATCH, record_throughput=True)
    counts = extract_sharded(sharded, CFG, "train", REQUESTS, shards=2,
                             runner=local_runner("cpu"))
    assert counts["written"] == 2 and counts["images"] == len(ref)
    (rate,) = throughput.read(sharded.store).values()  # what difftune plan's GPU-hours use
    assert rate["device"] == "cpu" and rate["images"] == counts["timed_images"] > 0
    assert rate["img_per_s"] == pytest.approx(counts["timed_images"] / counts["seconds"])
    got = sharded.get(CFG, "train", REQUESTS)  # a hit: the same API as an unsharded entry
    assert sharded.stats.forward_images == 0 and sharded.stats.entries_reused == 2
    for key in [(30, 4), (30, 10)]:
        assert isinstance(got.entries[key][0], tuple) and len(got.entries[key][0]) == 2
        for a, b in zip(rows(ref, key), rows(got, key), strict=True):
            np.testing.assert_array_equal(a, b)
    manifest = json.loads(next((tmp_path / "sharded").rglob("b10-p2-float16.json")).read_text())
    assert [p["rows"] for p in manifest["parts"]] == [32, len(ref) - 32]
    assert [p["start"] for p in manifest["parts"]] == [0, 32]
    # the budget and `cache rm` count and delete the parts
    assert sum(e.bytes for e in usage(sharded.store)[1]) > manifest["bytes"]
    assert remove(str(tmp_path / "sharded"), t=30) == 2
    assert not list((tmp_path / "sharded").rglob("*.arrow"))


def test_one_work_list_over_splits_and_timesteps_publishes_each_group_when_its_parts_are_in(
        tmp_path):
    requests = [(30, 2, 2), (70, 2, 2), (70, 4, 2)]  # shallow blocks: short passes
    worker = ShardWorker(threads=None)
    cache = FeatureCache(str(tmp_path / "c"), batch_size=BATCH)
    root = tmp_path / "c"
    seen = []  # (job, manifests published when it was about to run)

    def runner(jobs):
        assert len(jobs) == 8  # (train, val) x (t 30, 70) x 2 shards, handed over at once
        for i, job in enumerate(jobs):
            seen.append((job.label, len(list(root.rglob("*.json")))))
            yield i, worker.run(job)

    counts = extract_groups(cache, CFG, ("train", "val"), requests, shards=2, runner=runner)
    assert counts["written"] == 6 and counts["reused"] == 0
    assert worker.jobs_done == 8 and worker.images_done == counts["images"]
    # the jobs run group by group, and each group is published before the next one runs
    assert [label for label, _ in seen] == ["train t=30"] * 2 + ["train t=70"] * 2 + \
        ["val t=30"] * 2 + ["val t=70"] * 2
    assert [n for _, n in seen][::2] == [0, 1, 3, 4]  # t=30: 1 entry, t=70: 2 entries
    plain = FeatureCache(str(tmp_path / "plain"), batch_size=BATCH)
    for split in ("train", "val"):
        ref, got = plain.get(CFG, split, requests), cache.get(CFG, split, requests)
        for key in [(30, 2), (70, 2), (70, 4)]:
            assert isinstance(got.entries[key][0], tuple)  # parts: from the work list
            for a, b in zip(rows(ref, key), rows(got, key), strict=True):
                np.testing.assert_array_equal(a, b)
    assert cache.stats.forward_images == 0
    again = extract_groups(cache, CFG, ("train", "val"), requests, shards=2, runner=runner)
    assert again["written"] == 0 and again["reused"] == 6 and len(seen) == 8


def test_half_written_parts_and_incomplete_entries_are_never_read(tmp_path):
    root = str(tmp_path / "c")
    cache = FeatureCache(root, batch_size=BATCH)
    runner = local_runner("cpu")

    def dies_mid_shard(jobs):  # shard 0 completes; shard 1's node dies after a batch
        yield 0, run_shard(jobs[0])

        def die(done):
            raise RuntimeError("node lost")

        run_shard(jobs[1], on_batch=die)

    with pytest.raises(RuntimeError, match="node lost"):
        extract_sharded(cache, CFG, "train", REQUESTS[:1], shards=2, runner=dies_mid_shard)
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert any(PART_NAME.match(f) for f in files)  # shard 0's complete part
    assert not any(f.endswith(".json") for f in files)  # but no manifest: not visible

    # a half-written part (a temporary file, as a writer killed mid-write leaves it) is there
    # too: a reader finds no entry, so a trial would extract it itself
    _, _, ds, base, _, _ = cache.resolve(CFG, "train", REQUESTS[:1])
    key = dataclasses.replace(base, t=30, block=4)
    assert cache.lookup(key, 2, 8) is None
    group = next(p.parent for p in tmp_path.rglob("*.arrow"))
    (group / "b4-p2-float16.part0001-deadbeef.arrow.0123.tmp").write_bytes(b"ARROW1\0\0half")

    counts = extract_sharded(cache, CFG, "train", REQUESTS[:1], shards=2, runner=runner)
    assert counts["written"] == 1
    left = sorted(p.name for p in group.iterdir())
    manifest = json.loads((group / "b4-p2-float16.json").read_text())
    assert sorted(p["file"] for p in manifest["parts"]) == [f for f in left
                                                            if f.endswith(".arrow")]
    assert not [f for f in left if f.endswith(".tmp")]  # debris swept under the lock
    m = MappedEntry(tuple(str(group / p["file"]) for p in manifest["parts"]))
    assert int(m.offsets[-1]) == manifest["rows"] == len(ds)

    # a manifest naming a part that is not the one it describes is not served
    bad = dict(manifest, parts=[dict(manifest["parts"][0], sha256="0" * 64),
                                *manifest["parts"][1:]])
    (group / "b4-p2-float16.json").write_text(json.dumps(bad))
    fresh = FeatureCache(root, batch_size=BATCH)
    assert fresh.lookup(key, 2, 8) is None
