"""The Arrow feature cache (trainables/cache/) and the no-cache source (trainables.online):
hits equal fresh extraction, keys miss when their content changes, derived pools are exact,
publishing is atomic across killed writers and concurrent processes, corruption is caught,
and an S3-compatible store works across processes."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftune.trainables.cache import entry as cache_entry
from difftune.trainables.cache import store as cache_store
from difftune.trainables.cache.admin import list_entries, remove, total_bytes
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import dataset_indices, shared_dataset
from difftune.trainables.heads import build_head
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.online import OnlineFeatures
from difftune.trainables.model.unet import DEMO_CHECKPOINT, shared_unet
from difftune.trainables.pipeline import run_trial

REPO = Path(__file__).resolve().parents[2]
FRACTION = 0.04  # 40 digits training images: one forward batch per extraction


def cfg_(**kw) -> TrialConfig:
    return TrialConfig(**{"label_fraction": FRACTION, **kw})


def fresh(cfg: TrialConfig, t: int, block: int, pool: int) -> torch.Tensor:
    """Features extracted directly with the Extractor (no cache): [N x C x pool x pool]."""
    model, diffusion = shared_unet(cfg.model, cfg.checkpoint, "cpu")
    ds, _ = shared_dataset(cfg.data, "train", model.image_size, cfg.label_fraction, cfg.seed)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    out = Extractor(model, diffusion).extract(x, t, [block], indices=dataset_indices(ds), pool=pool,
                                              seed=cfg.noise_seed)
    return out[block]


def stacked(ds, key) -> torch.Tensor:
    return torch.stack([ds[i][0][key] for i in range(len(ds))])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float16 storage."""
    return torch.allclose(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))


# ------------------------------------------------------------------------------- basics


def test_hit_equals_fresh_extraction_and_counts(tmp_path):
    cfg = cfg_()
    requests = [(90, 2, 2), (90, 3, 1)]
    first = FeatureCache(str(tmp_path))
    ds = first.get(cfg, "train", requests)
    assert first.stats.entries_written == 2 and first.stats.forward_batches == 1
    assert first.stats.forward_images == len(ds) == 40
    assert ds.shapes() == {(90, 2): (32, 2, 2), (90, 3): (32, 1, 1)}
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 2))
    assert close(stacked(ds, (90, 3)), fresh(cfg, 90, 3, 1))
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [int(shared_dataset("digits", "train", 16, FRACTION, 0)[0][i][1])
                      for i in range(len(ds))]

    second = FeatureCache(str(tmp_path))
    again = second.get(cfg, "train", requests)
    assert second.stats.forward_batches == 0 and second.stats.entries_written == 0
    assert second.stats.entries_reused == 2
    assert torch.equal(stacked(again, (90, 2)), stacked(ds, (90, 2)))

    # a dataset for DataLoader workers pickles without its memory maps
    clone = pickle.loads(pickle.dumps(again))
    assert clone._maps is None and torch.equal(clone[5][0][(90, 3)], again[5][0][(90, 3)])

    entries = list_entries(str(tmp_path))
    assert [(e["t"], e["block"], e["pool"], e["rows"]) for e in entries] == [
        (90, 2, 2, 40), (90, 3, 1, 40)]
    assert total_bytes(str(tmp_path)) >= sum(e["bytes"] for e in entries) > 0
    assert remove(str(tmp_path), block=3) == 1
    assert [e["block"] for e in list_entries(str(tmp_path))] == [2]
    assert remove(str(tmp_path), model="demo") == 1 and list_entries(str(tmp_path)) == []


def test_stored_pool_serves_divisors_exactly(tmp_path):
    cfg = cfg_()
    writer = FeatureCache(str(tmp_path), store_pool=4)
    writer.get(cfg, "train", [(90, 2, 2)])
    assert [e["pool"] for e in list_entries(str(tmp_path))] == [4]

    reader = FeatureCache(str(tmp_path))
    ds = reader.get(cfg, "train", [(90, 2, 1)])
    ds2 = reader.get(cfg, "train", [(90, 2, 2)])
    ds4 = reader.get(cfg, "train", [(90, 2, 4)])
    assert reader.stats.forward_batches == 0 and reader.stats.entries_derived == 2
    assert ds.shapes()[(90, 2)] == (32, 1, 1)
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 1))
    assert close(stacked(ds2, (90, 2)), fresh(cfg, 90, 2, 2))
    # the derived pool is the exact pooling of the stored map
    stored = stacked(ds4, (90, 2))
    assert torch.allclose(stacked(ds2, (90, 2)),
                          torch.nn.functional.adaptive_avg_pool2d(stored, 2), atol=1e-6)

    # 3 does not divide 4: a miss, stored at 3
    reader.get(cfg, "train", [(90, 2, 3)])
    assert reader.stats.entries_written == 1
    assert sorted(e["pool"] for e in list_entries(str(tmp_path))) == [3, 4]


def test_miss_extracts_the_search_space_blocks_in_one_pass(tmp_path):
    cfg = cfg_()
    c = FeatureCache(str(tmp_path), extra_blocks=(1, 2, 3, 5, 12))
    c.get(cfg, "train", [(90, 3, 2)])
    assert c.stats.forward_batches == 1
    # the whole space block set, deeper ones included: one pass per image and timestep
    assert sorted(e["block"] for e in list_entries(str(tmp_path))) == [1, 2, 3, 5, 12]
    ds = c.get(cfg, "train", [(90, 1, 2)])
    assert c.stats.forward_batches == 1 and c.stats.entries_reused == 1
    assert close(stacked(ds, (90, 1)), fresh(cfg, 90, 1, 2))
    c.get(cfg, "train", [(90, 12, 2)])  # the deepest space block: no second pass
    assert c.stats.forward_batches == 1 and c.stats.entries_reused == 2


def test_changed_checkpoint_subset_or_seed_misses(tmp_path):
    root = str(tmp_path / "cache")
    base = cfg_()
    c = FeatureCache(root)
    ref = stacked(c.get(base, "train", [(90, 2, 2)]), (90, 2))

    state = torch.load(DEMO_CHECKPOINT, weights_only=True)
    name = "input_blocks.0.0.weight"
    state[name] = state[name] * 1.5
    torch.save(state, tmp_path / "other.pt")
    shutil.copy(DEMO_CHECKPOINT.with_suffix(".yaml"), tmp_path / "other.yaml")

    variants = [cfg_(model=str(tmp_path / "other.pt")), cfg_(noise_seed=1),
                cfg_(label_fraction=0.05), cfg_(seed=1)]
    for i, cfg in enumerate(variants, start=2):
        got = c.get(cfg, "train", [(90, 2, 2)])
        assert c.stats.entries_written == i, cfg
        assert c.stats.entries_reused == 0
        assert close(stacked(got, (90, 2)), fresh(cfg, 90, 2, 2))
    assert not close(stacked(c.get(variants[0], "train", [(90, 2, 2)]), (90, 2)), ref)
    assert not close(stacked(c.get(variants[1], "train", [(90, 2, 2)]), (90, 2)), ref)
    assert len({e["model_fp"] for e in list_entries(root)}) == 2
    assert len({(e["data_fp"], e["seed"]) for e in list_entries(root)}) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_entry_is_detected_and_reextracted(tmp_path, caplog, damage):
    cfg = cfg_()
    FeatureCache(str(tmp_path)).get(cfg, "train", [(90, 2, 2)])
    path = tmp_path / (list_entries(str(tmp_path))[0]["path"] + ".arrow")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    cache_entry.forget_verified()  # checked earlier by this process and node: trusted by mtime

    c = FeatureCache(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="difftune.trainables.cache.feature_cache"):
        ds = c.get(cfg, "train", [(90, 2, 2)])
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert c.stats.entries_corrupt == 1 and c.stats.entries_written == 1
    assert c.stats.forward_batches == 1
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 2))


# ------------------------------------------------------------------- across processes

CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
from difftune.trainables.cache import entry, feature_cache as cache
from difftune.trainables.config import TrialConfig
if spec.get("pause_dir"):  # freeze after the first written batch, to be killed
    real = entry.EntryWriter.write
    def write(self, *a, **k):
        real(self, *a, **k)
        open(os.path.join(spec["pause_dir"], "paused"), "w").close()
        time.sleep(600)
    entry.EntryWriter.write = write
if spec.get("barrier"):  # start extracting together
    open(os.path.join(spec["barrier"], str(spec["me"])), "w").close()
    while len(os.listdir(spec["barrier"])) < spec["n"]:
        time.sleep(0.01)
c = cache.FeatureCache(spec["root"], batch_size=spec.get("batch_size", 256),
                       mirror=spec.get("mirror"))
c.get(TrialConfig(label_fraction=spec["fraction"]), "train",
      [tuple(r) for r in spec["requests"]])
print("STATS " + json.dumps(c.stats.as_dict()))
"""


def child(spec: dict, **kw) -> subprocess.Popen:
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def stats_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith("STATS ")][-1]
    return json.loads(line[len("STATS "):])


def test_two_processes_extract_a_missing_entry_once(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    requests = [(90, 2, 2), (90, 3, 2)]
    spec = {"root": str(tmp_path / "cache"), "fraction": FRACTION, "requests": requests,
            "barrier": str(barrier), "n": 2}
    procs = [child({**spec, "me": i}) for i in range(2)]
    stats = [stats_of(p) for p in procs]
    assert sorted(s["entries_written"] for s in stats) == [0, 2]
    assert sorted(s["forward_batches"] for s in stats) == [0, 1]
    waiter = next(s for s in stats if s["entries_written"] == 0)
    assert waiter["entries_reused"] == 2
    assert len(list_entries(str(tmp_path / "cache"))) == 2


def test_writer_killed_mid_write_leaves_nothing_readable(tmp_path):
    root = tmp_path / "cache"
    spec = {"root": str(root), "fraction": FRACTION, "requests": [(90, 2, 2)],
            "pause_dir": str(tmp_path), "batch_size": 8}
    proc = child(spec)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "paused").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the writer never reached its first batch"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert list_entries(str(root)) == []
    left = {p.name for p in root.rglob("*") if p.is_file()}
    assert not any(n.endswith((".json", ".arrow")) for n in left)
    assert ".lock" in left  # the dead writer's lock, to be detected as stale

    cfg = cfg_()
    c = FeatureCache(str(root))
    ds = c.get(cfg, "train", [(90, 2, 2)])
    assert c.stats.entries_written == 1 and c.stats.forward_batches == 1
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 2))
    assert {p.name for p in root.rglob("*") if p.is_file()} == {"b2-p2-float16.arrow",
                                                                 "b2-p2-float16.json"}


def test_lock_of_a_silent_holder_on_another_node_goes_stale(tmp_path):
    cfg = cfg_()
    c = FeatureCache(str(tmp_path), lock_stale_s=1.0)
    c.get(cfg, "train", [(90, 1, 2)])  # makes the group folder
    lock = next(tmp_path.rglob("b1-p2-float16.json")).parent / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere|pid:[1]", "token": "x"}))
    ds = c.get(cfg, "train", [(90, 2, 2)])  # waits until the lock is 1 s untouched
    assert c.stats.lock_waits == 1 and c.stats.entries_written == 2
    assert not lock.exists()
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 2))



@pytest.mark.slow
def test_two_processes_extract_a_missing_entry_once_on_s3(tmp_path, s3_uri):
    """The S3 lock is an exclusive create (If-None-Match: *): of two processes that miss the
    same entry at the same moment, one extracts and the other reads its entries."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    spec = {"root": s3_uri, "fraction": FRACTION, "requests": [(90, 2, 2), (90, 3, 2)],
            "barrier": str(barrier), "n": 2}
    procs = [child({**spec, "me": i, "mirror": str(tmp_path / f"mirror{i}")})
             for i in range(2)]
    stats = [stats_of(p) for p in procs]
    assert sorted(s["forward_batches"] for s in stats) == [0, 1]
    assert sorted(s["entries_written"] for s in stats) == [0, 2]
    assert [(e["block"], e["rows"]) for e in list_entries(s3_uri)] == [(2, 40), (3, 40)]
    names = {i.base_name for i in cache_store.Store(s3_uri).files(recursive=True)}
    assert ".lock" not in names


@pytest.mark.slow
def test_object_store_entries_written_by_one_process_are_read_by_another(tmp_path, s3_uri):
    requests = [(90, 2, 2)]
    writer = stats_of(child({"root": s3_uri, "fraction": FRACTION, "requests": requests,
                             "mirror": str(tmp_path / "writer-mirror")}))
    assert writer["entries_written"] == 1 and writer["forward_batches"] == 1
    entries = list_entries(s3_uri)
    assert [(e["block"], e["pool"], e["rows"]) for e in entries] == [(2, 2, 40)]
    names = {i.base_name for i in cache_store.Store(s3_uri).files(recursive=True)}
    assert names == {"b2-p2-float16.arrow", "b2-p2-float16.json"}  # lock released

    cfg = cfg_()
    reader = FeatureCache(s3_uri, mirror=str(tmp_path / "mirror"))
    ds = reader.get(cfg, "train", requests)
    assert reader.stats.forward_batches == 0 and reader.stats.entries_reused == 1
    assert close(stacked(ds, (90, 2)), fresh(cfg, 90, 2, 2))
    assert remove(s3_uri, all=True) == 1 and list_entries(s3_uri) == []


# ----------------------------------------------------------------- trials and no-cache


def test_online_wrapper_holds_only_the_head_and_draws_fresh_noise():
    from difftune.trainables.heads import LinearHead

    cfg = cfg_(block=2, t=90, pool=2)
    src = OnlineFeatures()
    data = src.prepare(cfg, [(90, 2, 2)])
    assert data.shapes == {(90, 2): (32, 2, 2)}
    inputs, label = data.train[0]
    assert set(inputs) == {"image", "index"} and inputs["index"] == data.train.indices[0]
    head = LinearHead((90, 2), data.shapes[(90, 2)], data.num_classes)
    wrapped = data.wrap(head)
    assert wrapped.state_dict().keys() == head.state_dict().keys()
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in head.parameters()}
    batch = torch.utils.data.default_collate([data.train[i] for i in range(8)])[0]
    wrapped.eval()
    a, b = wrapped(batch), wrapped(batch)
    assert not torch.allclose(a, b)  # a fresh noise draw at every pass
    assert src.unet_images == 16 and src.extractor.forward_batches == 2
    head.load_state_dict(wrapped.state_dict())


@pytest.mark.parametrize("source", ["cache", "online"])
def test_a_trial_trains_from_either_source(tmp_path, source):
    cfg = cfg_(block=2, t=90, pool=2, epochs=1, batch_size=16)
    src = FeatureCache(str(tmp_path)) if source == "cache" else OnlineFeatures()
    head, history = run_trial(cfg, source=src)
    assert len(history) == 1 and history[0]["epoch"] == 1
    untrained = build_head(cfg, {(90, 2): (32, 2, 2)}, 10)
    assert not torch.equal(head.fc.weight, untrained.fc.weight)  # it trained
    if source == "cache":
        assert src.stats.entries_written == 2  # train and val
    else:  # every batch of every epoch ran the U-Net, train and val
        assert src.extractor.forward_batches == 3 + 2


# ------------------------------------------------- keys, verification and the budget


def test_precision_is_part_of_the_key(tmp_path):
    cfg = cfg_()
    fp32 = FeatureCache(str(tmp_path))
    assert fp32.precision == "fp32"  # the CPU's
    ref = stacked(fp32.get(cfg, "train", [(90, 2, 2)]), (90, 2))
    bf16 = FeatureCache(str(tmp_path), precision="bf16")
    got = stacked(bf16.get(cfg, "train", [(90, 2, 2)]), (90, 2))
    assert bf16.stats.entries_written == 1 and bf16.stats.entries_reused == 0
    assert not torch.equal(got, ref)  # it ran in bf16 ...
    assert torch.allclose(got, ref, rtol=0.1, atol=0.1 * float(ref.abs().max()))  # ... nearby
    entries = list_entries(str(tmp_path))
    assert sorted(e["precision"] for e in entries) == ["bf16", "fp32"]
    assert {e["path"].split("/")[2] for e in entries} == {"t90-s0-fp32", "t90-s0-bf16"}
    again = FeatureCache(str(tmp_path), precision="bf16")
    again.get(cfg, "train", [(90, 2, 2)])
    assert again.stats.entries_reused == 1 and again.stats.forward_batches == 0


def test_an_entry_is_read_whole_once_per_node(tmp_path, monkeypatch):
    cfg = cfg_()
    FeatureCache(str(tmp_path)).get(cfg, "train", [(90, 2, 2)])  # writes and verifies it
    reads = []
    real = cache_entry.MappedEntry.checksum
    monkeypatch.setattr(cache_entry.MappedEntry, "checksum",
                        lambda self: reads.append(1) or real(self))
    cache_entry.VERIFIED.clear()  # another process of this node
    FeatureCache(str(tmp_path)).get(cfg, "train", [(90, 2, 2)])
    assert reads == []  # trusted: this node verified it
    markers = list(Path(cache_entry.verified_dir()).glob("*.json"))
    assert markers
    cache_entry.forget_verified()  # another node
    c = FeatureCache(str(tmp_path))
    c.get(cfg, "train", [(90, 2, 2)])
    assert reads == [1] and c.stats.entries_reused == 1


def test_a_fingerprint_handed_by_the_driver_spares_the_walk(tmp_path, monkeypatch):
    from difftune.trainables.data import datasets as data
    from difftune.trainables.data import fingerprint

    cfg = cfg_()
    files = {s: data.files_fingerprint("digits", s) for s in ("train", "val")}
    FeatureCache(str(tmp_path)).get(cfg, "train", [(90, 2, 2)])
    monkeypatch.setattr(fingerprint, "files_fingerprint",
                        lambda *a, **k: pytest.fail("a trial fingerprinted the data"))
    c = FeatureCache(str(tmp_path), data_files=files)
    c.get(cfg, "train", [(90, 2, 2)])
    assert c.stats.entries_reused == 1


def test_budget_evicts_the_least_recently_used_entries(tmp_path):
    from difftune.trainables.cache.policy import usage

    cfg = cfg_()
    root = str(tmp_path / "cache")
    first = FeatureCache(root)
    held = first.get(cfg, "train", [(90, 2, 2)])  # a trial still reading it
    a = first.get(cfg, "train", [(10, 2, 2)])
    one = usage(cache_store.Store(root))[0] / 2  # bytes of one entry (all are alike)
    time.sleep(0.05)
    first.get(cfg, "train", [(90, 2, 2)])  # used again: now the newest
    later = FeatureCache(root, budget=int(2.5 * one))
    later.get(cfg, "train", [(50, 2, 2)])
    assert sorted(e["t"] for e in list_entries(root)) == [50, 90]  # t 10 was the oldest use
    assert usage(cache_store.Store(root))[0] <= 2.5 * one
    assert close(stacked(a, (10, 2)), fresh(cfg, 10, 2, 2))  # an open entry still reads
    assert len(held) == 40
    # what a process serves (t 50) is never evicted by it
    later.get(cfg, "train", [(30, 2, 2)])
    assert sorted(e["t"] for e in list_entries(root)) == [30, 50]


def test_make_room_spares_groups_being_written(tmp_path):
    from difftune.trainables.cache.policy import make_room, usage

    cfg = cfg_()
    root = str(tmp_path)
    FeatureCache(root).get(cfg, "train", [(90, 2, 2)])
    store = cache_store.Store(root)
    total, (entry,) = usage(store)
    (tmp_path / entry.group / ".lock").write_text("{}")
    assert make_room(store, 10**6, total) == 0 and len(list_entries(root)) == 1
    (tmp_path / entry.group / ".lock").unlink()
    assert make_room(store, 10**6, total) == entry.bytes and list_entries(root) == []


def test_stored_pool_rule():
    from difftune.trainables.cache.policy import stored_pool

    assert stored_pool(2, 16, 8) == 8  # 2 | 8 | 16: stored at 8, serves 1, 2, 4, 8
    assert stored_pool(2, 8, 16) == 8  # clamped to the map
    assert stored_pool(3, 16, 8) == 3  # 3 does not divide 8
    assert stored_pool(4, 12, 8) == 4  # 8 does not divide 12
    assert stored_pool(4, 16, None) == 4  # per-request: the pool asked


def test_a_miss_extracts_as_many_images_per_pass_as_fit_free_memory(tmp_path, monkeypatch):
    from difftune.trainables.cache import extract as cache_module
    from difftune.trainables.model.cost import activation_bytes_per_image
    from difftune.trainables.model.unet import resolve

    per_image, fixed = activation_bytes_per_image(resolve("demo")[0], 2)
    free = int((fixed + 16 * per_image) / 0.7) + 1  # room for 16 images of activations
    monkeypatch.setattr(cache_module, "free_memory", lambda device: free)
    c = FeatureCache(str(tmp_path))  # no batch size: what fits
    c.get(cfg_(), "train", [(90, 2, 2)])
    assert c.stats.forward_images == 40 and c.stats.forward_batches == 3  # 16 + 16 + 8
    fixed_batch = FeatureCache(str(tmp_path / "b"), batch_size=8)
    fixed_batch.get(cfg_(), "train", [(90, 2, 2)])
    assert fixed_batch.stats.forward_batches == 5


# ------------------------------------------------------------------------ splits and views


def test_the_three_splits_are_three_entries(tmp_path):
    """train, val and test of the same data never share an entry, nor its rows."""
    cfg = cfg_()
    c = FeatureCache(str(tmp_path))
    rows = {s: c.get(cfg, s, [(90, 2, 2)]).maps()[(90, 2)].column(0) for s in
            ("train", "val", "test")}
    entries = list_entries(str(tmp_path))
    assert sorted(e["split"] for e in entries) == ["test", "train", "val"]
    assert len({e["data_fp"] for e in entries}) == 3
    assert [len(rows[s]) for s in ("train", "val", "test")] == [40, 359, 360]
    assert not set(rows["val"]) & set(rows["test"]) and not set(rows["train"]) & set(rows["val"])


def test_views_are_seeded_crops_with_their_own_noise_and_cycle_by_epoch(tmp_path):
    from difftune.trainables.data.views import ViewCycle

    cfg = cfg_(views=3)
    c = FeatureCache(str(tmp_path))
    data = c.prepare(cfg, [(90, 2, 2)], splits=("train", "val"))
    assert isinstance(data.train, ViewCycle) and not isinstance(data.val, ViewCycle)
    entries = list_entries(str(tmp_path))
    assert sorted((e["split"], e["view"]) for e in entries) == [
        ("train", 0), ("train", 1), ("train", 2), ("val", 0)]
    # view 0 is the K = 1 entry (the image itself, the contract's noise)
    assert close(stacked(data.train.views[0], (90, 2)), fresh(cfg, 90, 2, 2))
    seen = []
    for epoch in range(4):
        data.train.set_epoch(epoch)
        seen.append(stacked(data.train, (90, 2)))
    assert torch.equal(seen[0], seen[3]) and not close(seen[0], seen[1])
    assert not close(seen[1], seen[2])
    assert [data.train[i][1] for i in range(5)] == [data.train.views[0][i][1] for i in range(5)]
    # seeded: another cache extracts the same views; K = 1 reuses view 0
    again = FeatureCache(str(tmp_path / "again")).prepare(cfg, [(90, 2, 2)])
    again.train.set_epoch(1)
    assert close(stacked(again.train, (90, 2)), seen[1])
    one = FeatureCache(str(tmp_path))
    one.prepare(cfg_(views=1), [(90, 2, 2)])
    assert one.stats.forward_batches == 0 and one.stats.entries_reused == 2
