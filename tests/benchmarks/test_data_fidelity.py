"""benchmarks/data_fidelity.py: the rung search's replay (Ray Tune's ASHA over rungs, the
passes it is priced at) on hand-made tables whose answers are known, and the script's tiny
mode end to end (a table of 8 configs built through the real cache, 2 seeds)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
KEYS = [(1, 0, 1), (1, 0, 2), (2, 0, 1), (2, 0, 2), (1, 30, 1), (1, 30, 2), (2, 30, 1),
        (2, 30, 2)]


@pytest.fixture(scope="module")
def fid():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield importlib.import_module("benchmarks.data_fidelity")


def table(fid, score):
    """Four rungs of 10/20/50/100 train and 5/10/25/50 val images; every step 1 s of head
    training and no U-Net seconds (steps end in lockstep, ties to the earlier trial)."""
    return fid.Table(scores={k: [score(k, r) for r in range(4)] for k in KEYS},
                     test=dict.fromkeys(KEYS, 90.0),
                     rows={"train": [10, 20, 50, 100], "val": [5, 10, 25, 50]},
                     unet_s=0.0, train_s=[1.0] * 4)


def replay(fid, tab, budget, order):
    """The rung search over ``order`` (the configs enqueued, in that order)."""
    with fid.space_file(fid.space_text(KEYS)) as path:
        space = fid.load(path, seed=2000, trials=budget)
        points = [{"block": b, "t": t, "pool": p} for b, t, p in order]
        return fid.replay_rungs(space, tab, fid.tpe(space), budget, startup=points)


def test_asha_never_stops_a_trial_better_than_every_one_recorded_at_its_rung(fid):
    order = KEYS[:6]
    tab = table(fid, lambda k, r: 10.0 * order.index(k) + r if k in order else 0.0)
    steps = replay(fid, tab, 6, order)
    assert [s.trial for s in steps if s.rung == 3] == list(range(6))  # all six reach it
    assert steps[-1].passes == 2 * tab.images(3)  # both timesteps extended to all images


def test_asha_keeps_only_the_top_half_of_a_rung_and_passes_follow_the_deepest_rung(fid):
    order = [KEYS[0], KEYS[1], KEYS[4], KEYS[5]]  # t 0, 0, 30, 30; worse and worse
    tab = table(fid, lambda k, r: 100.0 - 10.0 * order.index(k) if k in order else 0.0)
    steps = replay(fid, tab, 4, order)
    deepest = {}
    for s in steps:
        deepest[s.trial] = max(deepest.get(s.trial, -1), s.rung)
    # trials 0 and 1 run side by side: 1 reports after 0 at every rung, below its cutoff;
    # 2 and 3 score below every rung-0 score recorded before them
    assert deepest == {0: 3, 1: 0, 2: 0, 3: 0}
    assert steps[-1].passes == tab.images(3) + tab.images(0)
    assert [s.passes for s in steps] == sorted(s.passes for s in steps)
    picks = fid.rung_picks(tab, steps)
    assert [k for _, k in picks] == [KEYS[0]]
    answer, kept = fid.rung_answer(tab, steps, 90.0)
    assert answer is kept and answer.rung == 3 and answer.trial == 0
    assert fid.rung_answer(tab, steps, 95.0) == (None, None)


def test_the_tiny_mode_reproduces_the_grid_at_the_last_rung(fid, tmp_path):
    # two processes, a timestep each: the merged table is the one-process table
    summary = fid.main(["--tiny", str(tmp_path), "--seeds", "2", "--max-trials", "6",
                        "--jobs", "2"])
    assert summary["full_equals_grid"] is True  # trained from the prefix entries
    assert summary["spearman_rung3"] == pytest.approx(1.0)
    raw = json.loads((tmp_path / "tiny_rungs.json").read_text())
    # the cache passed train + val once per timestep over all the rungs: the replay's price
    assert raw["unet_images"] == {"0": 1437, "30": 1437}
    assert raw["rows"] == {"train": [50, 108, 539, 1078], "val": [50, 50, 180, 359]}
    for arm in ("flat", "rungs", "probe"):
        assert summary[f"{arm}_search_passes"] <= 2 * 1437
    assert 1 <= summary["rungs_full_trials"] <= summary["flat_full_trials"] == 6


def test_the_augmented_task_keeps_each_digits_copies_in_its_split_and_lifts_rung0_off_the_floor(
        fid, tmp_path):
    from difftune.trainables.data.datasets import load_dataset, targets_of
    from difftune.trainables.data.order import rung_rows

    tasks = importlib.import_module("benchmarks.data_fidelity_tasks")
    root = tasks.augmented_digits(tmp_path, copies=3, degrees=20, shift=2, sigma=0.3)
    sizes = {"train": 1078, "val": 359, "test": 360}
    for split, n in sizes.items():
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == 3 * n
        stems = {f.stem.split("_")[0] for f in files}  # a digit's copies share its number
        assert len(stems) == n
        first = files[0]
        a, b = (np.asarray(Image.open(first.with_name(f"{first.stem[:-2]}_{c}.png")))
                for c in (0, 1))
        assert (a != b).any()  # each copy drawn on its own
    ds, _ = load_dataset(str(root), split="train", image_size=16)
    assert rung_rows(targets_of(ds), 0.02, 5) == 65 > 50  # 2 % of 3,234: above the floor
