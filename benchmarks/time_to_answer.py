"""Time to answer: the U-Net image-passes, GFLOPs and head epochs a search spends until its
pick is as good on **test** as the val-oracle's pick, against running the whole grid the
paper's way; replayed over the demo grid of :mod:`benchmarks.optuna_vs_random` (456 configs,
a linear probe of 4 epochs) with the same replay of ``difftune search`` (TPE, and random
search for comparison).

- **The answer**: the val-oracle trains every config and picks the best val; 7 configs tie
  there, so its pick scores their mean test (95.83 on the shipped grid). A search has
  answered after n trials when its pick among them (the best val, ties to the earlier
  trial: :mod:`difftune.search.records.best`) scores at least that on test. A search that has
  not answered after ``--max-trials`` is counted as never (``unanswered``; a median is
  reported only while fewer than half never answer: an ``inf`` median says more than half
  did not). A search has no way to see test, so one that answered early may later pick a
  config of higher val and lower test: ``kept_*`` counts instead the trials from which the
  pick stays as good up to ``--max-trials`` (never, for the ``1 - kept_share`` of searches
  whose last pick is worse).
- **A search's cost, priced as difftune runs it**: with the cache (block-set policy) a trial
  at a timestep not seen before extracts it once over train + val (1078 + 359 digits; every
  block of the space comes from that one pass, which runs to the deepest block, 19); later
  trials at that t only read. Image-passes = distinct timesteps among the first n trials x
  1437; GFLOPs = image-passes x a full demo pass. Head epochs = n x 4.
- **The whole grid the paper's way**: every config trains its 4 epochs rerunning the U-Net on
  the train images at every epoch, plus ``--evals`` val passes per config (1: the paper
  evaluates every 7 epochs and at the end), each pass stopped at the config's own block
  (its GFLOPs from :func:`difftune.trainables.model.cost.model_costs`). Head epochs = 456 x 4.

Medians and 95 % bootstrap intervals over the seeds, which must lie outside the range the
sampler's settings were tuned on (``--tune-seeds``). The champion's one test pass is the
same for every way and left out.

    python -m benchmarks.time_to_answer [--first-seed 2000] [--seeds 400] [--max-trials 60]
        [--evals 1] [--tune-seeds 0-1099]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import optuna

from benchmarks._results import arguments, configure, record
from benchmarks.optuna_vs_random import (
    BLOCKS,
    EPOCHS,
    TUNE_SEEDS,
    Grid,
    Key,
    load_grid,
    oracle,
    picks,
    run_arm,
    seed_range,
    space_file,
)

logger = logging.getLogger("time_to_answer")

ARMS = ("tpe", "random")
#: a test score counts as reaching the oracle's within this (float sums of k/360 scores)
TOLERANCE = 1e-9


def answer_time(grid: Grid, tried: Sequence[Key], threshold: float) -> int | None:
    """The first n such that the pick among ``tried[:n]`` scores at least ``threshold`` on
    test (None: never within ``tried``)."""
    for n, k in enumerate(picks(grid, tried), start=1):
        if grid[k]["test"] >= threshold - TOLERANCE:
            return n
    return None


def kept_time(grid: Grid, tried: Sequence[Key], threshold: float) -> int | None:
    """The first n from which the pick scores at least ``threshold`` on test for every
    longer prefix of ``tried`` (None: the pick after all of ``tried`` scores less)."""
    n = len(tried)
    for k in reversed(picks(grid, tried)):
        if grid[k]["test"] < threshold - TOLERANCE:
            break
        n -= 1
    return None if n == len(tried) else n + 1


def cache_passes(tried: Sequence[Key], images: int) -> int:
    """Image-passes of the trials ``tried`` with the cache (block-set policy): one pass over
    ``images`` per distinct timestep."""
    return len({t for _, t, _ in tried}) * images


def paper_cost(configs: Sequence[Key], gflops_to: dict[int, float], *, train: int, val: int,
               epochs: int, evals: int) -> tuple[int, float]:
    """``(image-passes, GFLOPs)`` of training ``configs`` the paper's way: every epoch reruns
    the U-Net over ``train``, each evaluation over ``val``, each pass stopped at the config's
    block (``gflops_to``: block -> GFLOPs per image of a pass to it)."""
    per = epochs * train + evals * val
    return len(configs) * per, float(sum(per * gflops_to[b] for b, _, _ in configs))


def median_ci(values: Sequence[float], *, reps: int = 10000, seed: int = 0
              ) -> tuple[float, float, float]:
    """The median of ``values`` (``inf`` for a search that never answered) and its 95 %
    percentile bootstrap interval; no interpolation, so that ``inf`` stays ``inf``."""
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.quantile(arr[rng.integers(0, len(arr), size=(reps, len(arr)))], 0.5, axis=1,
                       method="inverted_cdf")
    return (float(np.quantile(arr, 0.5, method="inverted_cdf")),
            float(np.quantile(meds, 0.025, method="inverted_cdf")),
            float(np.quantile(meds, 0.975, method="inverted_cdf")))


def put(summary: dict[str, object], name: str, values: Sequence[float]) -> None:
    med, lo, hi = median_ci(values)
    summary[f"{name}_median"], summary[f"{name}_lo"], summary[f"{name}_hi"] = med, lo, hi


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--first-seed", type=int, default=2000,
                    help="seeds first-seed .. first-seed + seeds - 1 (default 2000)")
    ap.add_argument("--tune-seeds", default=TUNE_SEEDS,
                    help=f"the range the sampler was tuned on (default {TUNE_SEEDS})")
    ap.add_argument("--max-trials", type=int, default=60,
                    help="each search's budget (its trials setting; default 60)")
    ap.add_argument("--evals", type=int, default=1,
                    help="val passes per config the paper's way (default 1)")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="trials in flight (default: the space's search.max_concurrent, 2)")
    args = ap.parse_args()
    configure()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if set(seeds) & set(seed_range(args.tune_seeds)):
        raise SystemExit(f"seeds overlap the tuning range {args.tune_seeds}")

    from difftune.trainables.data.splits import digits_positions
    from difftune.trainables.model.cost import gflops_to, model_costs

    grid = load_grid()
    train, val = len(digits_positions("train")), len(digits_positions("val"))
    costs = model_costs("demo")
    to = {b: gflops_to(costs, [b]) for b in BLOCKS}
    full = gflops_to(costs, BLOCKS)  # block-set: one pass serves every block of the space
    threshold, ties = oracle(grid)
    grid_passes, grid_gflops = paper_cost(list(grid), to, train=train, val=val,
                                          epochs=EPOCHS, evals=args.evals)
    summary: dict[str, object] = {
        "seeds": f"{seeds.start}-{seeds.stop - 1}", "tune_seeds": args.tune_seeds,
        "max_trials": args.max_trials, "grid": len(grid), "epochs": EPOCHS,
        "train_images": train, "val_images": val, "paper_evals": args.evals,
        "oracle_test": threshold, "oracle_ties": ties,
        "grid_paper_passes": grid_passes, "grid_paper_gflops": grid_gflops,
        "grid_paper_epochs": len(grid) * EPOCHS,
        "grid_cache_passes": cache_passes(list(grid), train + val)}
    with space_file() as path:
        for arm in ARMS:
            trials, passes, gflops, kept, kept_passes = [], [], [], [], []
            for seed in seeds:
                tried = run_arm(path, grid, arm, seed, args.max_trials, args.max_concurrent)
                n = answer_time(grid, tried, threshold)
                trials.append(math.inf if n is None else n)
                p = math.inf if n is None else cache_passes(tried[:n], train + val)
                passes.append(p)
                gflops.append(p * full)
                n = kept_time(grid, tried, threshold)
                kept.append(math.inf if n is None else n)
                kept_passes.append(math.inf if n is None else
                                   cache_passes(tried[:n], train + val))
            logger.warning("%s done", arm)
            summary[f"{arm}_unanswered"] = sum(math.isinf(x) for x in trials)
            summary[f"{arm}_kept_share"] = sum(not math.isinf(x) for x in kept) / len(seeds)
            put(summary, f"{arm}_trials", trials)
            put(summary, f"{arm}_passes", passes)
            put(summary, f"{arm}_gflops", gflops)
            put(summary, f"{arm}_epochs", [x * EPOCHS for x in trials])
            put(summary, f"{arm}_ratio", [grid_passes / p for p in passes])
            put(summary, f"{arm}_gflops_ratio", [grid_gflops / g for g in gflops])
            put(summary, f"{arm}_kept_trials", kept)
            put(summary, f"{arm}_kept_passes", kept_passes)
            put(summary, f"{arm}_kept_ratio", [grid_passes / p for p in kept_passes])
    record("time_to_answer", **summary)


if __name__ == "__main__":
    main()
