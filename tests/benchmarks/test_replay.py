"""The replays behind benchmarks/optuna_vs_random.py and benchmarks/time_to_answer.py, on tiny
hand-made grids whose answers are known, and one replay of difftune's TPE against random
search on a synthetic grid over the demo space. No model, no Ray."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """The two benchmark modules, imported as ``python -m benchmarks.NAME`` would."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        ovr = importlib.import_module("benchmarks.optuna_vs_random")
        tta = importlib.import_module("benchmarks.time_to_answer")
        yield ovr, tta


#: four configs; two tie at the best val with different tests
GRID = {(1, 0, 1): {"val": 90.0, "test": 91.0}, (2, 0, 1): {"val": 95.0, "test": 92.0},
        (3, 10, 1): {"val": 95.0, "test": 96.0}, (4, 10, 2): {"val": 80.0, "test": 99.0}}


def test_the_pick_is_the_best_val_and_ties_go_to_the_earlier_trial(bench):
    ovr, _ = bench
    tried = [(1, 0, 1), (3, 10, 1), (2, 0, 1)]
    assert ovr.pick(GRID, tried) == (3, 10, 1)
    assert ovr.pick(GRID, list(reversed(tried))) == (2, 0, 1)
    assert ovr.picks(GRID, tried) == [(1, 0, 1), (3, 10, 1), (3, 10, 1)]
    assert ovr.regret_on_val(GRID, tried[:1]) == 5.0
    assert ovr.regret_on_test(GRID, tried) == 3.0  # 99 (never picked by val) - 96
    assert ovr.regret_on_test(GRID, list(reversed(tried))) == 7.0


def test_the_val_oracle_scores_the_mean_test_of_its_ties(bench):
    ovr, _ = bench
    assert ovr.oracle(GRID) == (94.0, 2)


def test_a_search_answers_when_its_pick_reaches_the_oracle_and_keeps_it_only_if_it_stays(bench):
    _, tta = bench
    tried = [(1, 0, 1), (4, 10, 2), (2, 0, 1), (3, 10, 1)]  # picks: 91, 91, 92, 92
    assert tta.answer_time(GRID, tried, 92.0) == 3
    assert tta.kept_time(GRID, tried, 92.0) == 3
    assert tta.answer_time(GRID, tried, 91.0) == 1
    assert tta.answer_time(GRID, tried, 94.0) is None
    lucky = [(4, 10, 2), (1, 0, 1)]  # answers at once (99), then picks 91 by its higher val
    assert tta.answer_time(GRID, lucky, 95.0) == 1
    assert tta.kept_time(GRID, lucky, 95.0) is None


def test_passes_are_priced_per_timestep_with_the_cache_and_per_epoch_and_block_without(bench):
    _, tta = bench
    assert tta.cache_passes([(1, 0, 1), (2, 0, 1), (3, 10, 1)], 100) == 200
    passes, gflops = tta.paper_cost([(1, 0, 1), (3, 10, 1)], {1: 1.0, 3: 2.0}, train=10,
                                    val=5, epochs=4, evals=1)
    assert (passes, gflops) == (90, 135.0)


def test_a_median_with_searches_that_never_answered(bench):
    _, tta = bench
    assert tta.median_ci([1, 2, math.inf])[0] == 2
    med, lo, hi = tta.median_ci([1, math.inf, math.inf])
    assert math.isinf(med) and math.isinf(hi)


def test_report_seeds_must_not_overlap_the_tuning_seeds(bench):
    ovr, _ = bench
    assert list(ovr.seed_range("3-5")) == [3, 4, 5]
    with pytest.raises(SystemExit, match="overlap"):
        ovr.report(GRID, range(90, 110), "0-99", None)


def test_difftune_tpe_beats_random_search_on_a_grid_with_one_clear_peak(bench):
    """A smooth synthetic grid over the demo space (val falls with the distance from block
    4, t 30, pool 4): over a few seeds, TPE's val regret after 20 trials is below random
    search's, and every search runs its budget (the paper's config first for TPE)."""
    ovr, _ = bench
    ts = ovr.TIMESTEPS
    grid = {(b, t, p): {"val": 100.0 - 2 * abs(b - 4) - 3 * abs(ts.index(t) - 2)
                        - 4 * (4 - p), "test": 0.0}
            for b in ovr.BLOCKS for t in ts for p in ovr.POOLS}
    regrets: dict[str, list[float]] = {"tpe": [], "random": []}
    with ovr.space_file() as path:
        for seed in range(4):
            for arm in regrets:
                tried = ovr.run_arm(path, grid, arm, seed, 20)
                assert len(tried) == 20
                if arm == "tpe":
                    assert tried[0] == ovr.PAPER
                regrets[arm].append(ovr.regret_on_val(grid, tried))
    assert sum(regrets["tpe"]) < sum(regrets["random"])
