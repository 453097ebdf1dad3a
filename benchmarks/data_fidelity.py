"""Rungs over images (issue 23): the U-Net image-passes (and compute seconds) a search spends
until its pick is as good on **test** as the val-oracle's pick, with and without rungs over
images, replayed over the demo space's linear-head configs (blocks 1-19 x every timestep of
``spaces/demo.yaml``, 0 to 500 step 10 x pool {1, 2, 4}: 2,907 configs, the recipe of
:mod:`benchmarks.optuna_vs_random`'s grid, which holds 8 of the timesteps); and how well each
rung's scores rank the configs.

The table (:mod:`benchmarks.data_fidelity_table`, ``benchmarks/demo_rungs.json``,
``--rebuild``): every config trained from scratch at each rung of ``[0.02, 0.1, 0.5, 1.0]``
(a floor of 5 images per class) on the rung's sample of train (a prefix of the split's
interleaved order, read with ``FeatureCache.get_prefix``; an epoch reads it
``Rung.passes`` times, as a search's trial does: 8, 8, 2, 1) for its full 4 epochs and
scored on the rung's sample of val; the last rung reproduces the grid at its 8 timesteps
(``full_equals_grid``).
``spearman_rungK``: Spearman's rho between rung K's val and the full val over the configs;
``spearman_probe``: between the probe rung's map and each (block, t)'s best full val;
``oracle_rank_rungK``: rung K's rank of the val-oracle's config (how early a rung could
single out the config a search must find).

Three searches per report seed, each of ``--max-trials`` trials over that space (``t`` an
int with step 10, as the demo space gives it to TPE; the space's seed, its enqueued paper
config and difftune's TPE, :func:`difftune.search.run.tuner.sampler_for`, 2
trials in flight):

- **no rungs** (``flat``): :mod:`benchmarks.time_to_answer`'s replay: every trial trains on
  all images; passes: train + val once per distinct timestep among the finished trials
  (block-set policy: one pass per image and t serves every block and pool).
- **rungs** (``rungs``): each trial trains at rung k on rung k's samples and reports
  ``rung_budget = rf^k`` to Ray Tune's own ASHA scheduler (``time_attr="rung_budget"``,
  grace 1, the space's reduction factor rf = 2, max_t rf^3; driven with stand-in trial
  ids), which stops it unless its score is in the top 1/rf of the scores recorded at that
  rung so far; Optuna is
  told the score at the rung the trial reached. Trials run asynchronously, 2 at a time: a
  step lasts its U-Net seconds (the new images it extracts, at the measured rate) plus its
  head's (measured per rung); events in time order, ties to the earlier trial. The pick is
  the best val among the trials that finished the last rung (ties to the earlier trial).
  Passes: per timestep, train + val rows of the deepest rung any finished step at t reached
  (entries extend by the new images only).
- **probe rung** (``probe``): first every timestep at rung 0 (those passes counted) and a
  closed-form ridge probe (:mod:`difftune.trainables.train.ridge`) of every (block, t) at the
  widest pool; then the rung search with the best (block, t) cells enqueued as its startup
  trials (as many as :func:`~difftune.search.space.distributions.startup_trials`, after the
  paper config).

The answer: as :mod:`benchmarks.time_to_answer` (the val-oracle's mean test over its ties).
Passes are counted over the work finished when the pick first scores that well (``answer``)
and when it scores that well from then on to the end of the search (``kept``). Medians and
95 % bootstrap intervals over report seeds disjoint from the sampler's tuning seeds;
``pass_ratio``: the median passes with rungs over the median without (paired bootstrap over
seeds); ``compute_ratio`` likewise for modelled seconds (the U-Net's measured seconds per
image x passes + the measured head seconds of every finished step + the probes: what one
worker computes, not a wall clock of a real search). ``best_val``, ``within_1pt`` (configs
within a point of the best val) and ``top10_val_spread`` say how easy the task is.

``--task noisy|augmented``: the made tasks of :mod:`benchmarks.data_fidelity_tasks` (noisy:
the digits with pixel noise and a blanked square; augmented: 8 rotated, shifted, noisy
copies of each, so rung 0's 2 % clears the floor). ``--tiny DIR``: a table of 8 configs
built in DIR, printed, no RESULTS row (the test). ``--jobs N``: N processes build a table.

    python -m benchmarks.data_fidelity [--task digits|noisy|augmented] [--seeds 400]
        [--first-seed 2000] [--max-trials 60] [--reduction-factor 2] [--rebuild] [--jobs 2]
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna

from benchmarks._results import arguments, configure, record
from benchmarks.data_fidelity_table import (
    FLOOR,
    FRACTIONS,
    TASKS,
    TIMESTEPS,
    Table,
    make_table,
    median_ratio,
    oracle_ranks,
    probe_spearman,
    read_table,
    spearman,
    table_keys,
    tiny_keys,
)
from benchmarks.data_fidelity_tasks import MAKERS
from benchmarks.optuna_vs_random import (
    TIMESTEPS as GRID_TIMESTEPS,
)
from benchmarks.optuna_vs_random import (
    TUNE_SEEDS,
    Key,
    load,
    load_grid,
    oracle,
    pick,
    run_arm,
    seed_range,
    space_file,
    tpe,
)
from benchmarks.time_to_answer import TOLERANCE, answer_time, cache_passes, kept_time, median_ci
from difftune.trainables.data.order import DEFAULT_STEPS

logger = logging.getLogger("data_fidelity")

ARMS = ("flat", "rungs", "probe")


# --------------------------------------------------------------------- the rung search
@dataclass(frozen=True)
class Step:
    """A finished step of a trial: ``trial`` (its start order) at ``rung``, its ``key``
    and val ``score`` there; ``passes`` and ``seconds`` spent by all finished work then."""

    trial: int
    key: Key
    rung: int
    score: float
    passes: int
    seconds: float


def replay_rungs(space, table: Table, sampler: optuna.samplers.BaseSampler, budget: int, *,
                 probed: bool = False, startup: Sequence[dict] = ()) -> list[Step]:
    """The steps a search of ``budget`` trials with rungs over images finishes, in order.

    :param probed: the probe rung ran first (every timestep at rung 0, its seconds).
    :param startup: points enqueued after the space's own (the probe's best cells).
    """
    from ray.tune.schedulers import ASHAScheduler

    from difftune.trainables.params import decode

    last, rf = table.rungs - 1, int(space.search["reduction_factor"])
    asha = ASHAScheduler(time_attr="rung_budget", metric="val_top1", mode="max",
                         max_t=rf ** last, grace_period=1, reduction_factor=rf)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in [*space.points_to_evaluate(), *startup]:
        study.enqueue_trial(point)
    timesteps = {t for _, t, _ in table.scores}
    deep = dict.fromkeys(timesteps, 0 if probed else -1)  # t -> deepest finished rung
    started = dict(deep)  # t -> deepest rung extracted (what a step's seconds depend on)
    seconds = table.probe_s if probed else 0.0  # + the U-Net's, from the passes at each step
    events: list[tuple[float, int, int]] = []  # (finishes at, trial, rung)
    trials: dict[int, tuple[optuna.trial.Trial, Key, SimpleNamespace]] = {}
    steps: list[Step] = []
    n = 0

    def start(i: int, k: int, now: float) -> None:
        t = trials[i][1][1]
        new = table.images(k) - (table.images(started[t]) if started[t] >= 0 else 0)
        started[t] = max(started[t], k)
        heapq.heappush(events, (now + table.unet_s * max(0, new) + table.train_s[k], i, k))

    def launch(now: float) -> None:
        nonlocal n
        while len(events) < int(space.search["max_concurrent"]) and n < budget:
            trial = study.ask()
            cfg = decode({**space.define_by_run(trial), **trial.params})
            trials[n] = (trial, (cfg["block"], cfg["t"], cfg["pool"]),
                         SimpleNamespace(trial_id=str(n)))
            asha.on_trial_add(None, trials[n][2])
            start(n, 0, now)
            n += 1

    launch(0.0)
    while events:
        now, i, k = heapq.heappop(events)
        trial, key, fake = trials[i]
        score = table.scores[key][k]
        deep[key[1]] = max(deep[key[1]], k)
        seconds += table.train_s[k]
        result = {"rung_budget": rf ** k, "val_top1": score}
        passes = sum(table.images(r) for r in deep.values() if r >= 0)
        steps.append(Step(i, key, k, score, passes,
                          seconds + table.unet_s * passes))
        if k < last and asha.on_trial_result(None, fake, result) == "CONTINUE":
            start(i, k + 1, now)
        else:
            asha.on_trial_complete(None, fake, result)
            study.tell(trial, score)
            launch(now)
    return steps


def rung_picks(table: Table, steps: Sequence[Step]) -> list[tuple[Step, Key]]:
    """After each finished step of the last rung: the pick (the best full val among the
    trials that finished the last rung, ties to the earlier trial)."""
    out: list[tuple[Step, Key]] = []
    best: tuple[float, int, Key] | None = None
    for s in steps:
        if s.rung == table.rungs - 1:
            cand = (-s.score, s.trial, s.key)
            best = cand if best is None or cand < best else best
            out.append((s, best[2]))
    return out


def rung_answer(table: Table, steps: Sequence[Step], threshold: float
                ) -> tuple[Step | None, Step | None]:
    """``(answer, kept)``: the step at which the pick first scores ``threshold`` on test, and
    the one from which it does to the end (None: never)."""
    picks = rung_picks(table, steps)
    good = [table.test[k] >= threshold - TOLERANCE for _, k in picks]
    answer = next((s for (s, _), g in zip(picks, good, strict=True) if g), None)
    kept = None
    for (s, _), g in reversed(list(zip(picks, good, strict=True))):
        if not g:
            break
        kept = s
    return answer, kept


def probe_startup(space, table: Table) -> list[dict]:
    """The probe rung's best (block, t) cells, as many as the search's startup trials: the
    partial points the probe arm enqueues (pool sampled as usual)."""
    from difftune.search.space.distributions import startup_trials

    best = sorted(table.probe, key=lambda c: (-table.probe[c], c))
    n = startup_trials(int(space.search["trials"]))
    return [{"block": b, "t": t} for b, t in best[:n]]


# --------------------------------------------------------------------------- the report
def space_text(keys: Sequence[Key]) -> str:
    """The replayed space: :data:`benchmarks.optuna_vs_random.SPACE` over ``keys``'s blocks,
    timesteps and pools; over :data:`TIMESTEPS` the demo space's own ``t`` (an int, step 10,
    as TPE sees it in ``spaces/demo.yaml``), else a choice of them (``--tiny``)."""
    from benchmarks.optuna_vs_random import SPACE

    blocks, ts, pools = (sorted({k[i] for k in keys}) for i in range(3))
    t = "{int: [0, 500], step: 10}" if ts == TIMESTEPS else f"{{choice: {ts}}}"
    return SPACE.replace("[1, 19]", f"[{blocks[0]}, {blocks[-1]}]").replace(
        f"{{choice: {GRID_TIMESTEPS}}}", t).replace(str([1, 2, 4]), str(pools))


def run_seed(path: str, table: Table, seed: int, budget: int, threshold: float,
             rf: int | None = None) -> dict[str, dict[str, float]]:
    """One seed's three searches: per arm, passes and seconds to the answer and to the kept
    answer (``inf``: never), the whole search's passes, its last pick's test, and the trials
    that finished the last rung."""
    grid, last, inf = table.grid(), table.rungs - 1, math.inf
    full = table.images(last)
    out: dict[str, dict[str, float]] = {}
    tried = run_arm(path, grid, "tpe", seed, budget)

    def flat(n: int | None) -> tuple[float, float]:
        if n is None:
            return inf, inf
        p = cache_passes(tried[:n], full)
        return p, p * table.unet_s + n * table.train_s[last]

    (pa, sa), (pk, sk) = flat(answer_time(grid, tried, threshold)), \
        flat(kept_time(grid, tried, threshold))
    out["flat"] = {"passes": pa, "seconds": sa, "kept_passes": pk, "kept_seconds": sk,
                   "search_passes": cache_passes(tried, full), "full_trials": len(tried),
                   "final_test": grid[pick(grid, tried)]["test"]}
    for arm in ("rungs", "probe"):
        space = load(path, seed=seed, trials=budget)
        if rf is not None:
            space.search["reduction_factor"] = rf
        steps = replay_rungs(space, table, tpe(space), budget, probed=arm == "probe",
                             startup=probe_startup(space, table) if arm == "probe" else ())
        answer, kept = rung_answer(table, steps, threshold)
        picks = rung_picks(table, steps)
        out[arm] = {"passes": answer.passes if answer else inf,
                    "seconds": answer.seconds if answer else inf,
                    "kept_passes": kept.passes if kept else inf,
                    "kept_seconds": kept.seconds if kept else inf,
                    "search_passes": steps[-1].passes,
                    "full_trials": sum(s.rung == last for s in steps),
                    "final_test": table.test[picks[-1][1]] if picks else math.nan}
    return out


def report(table: Table, seeds: range, budget: int, *, task: str = "digits",
           rf: int | None = None) -> dict[str, object]:
    """The summary of the three searches on ``seeds`` (and the table's own figures)."""
    grid = table.grid()
    threshold, ties = oracle(grid)
    rho = spearman(table)
    val = np.array([v["val"] for v in grid.values()])
    summary: dict[str, object] = {
        "task": task, "seeds": f"{seeds.start}-{seeds.stop - 1}", "tune_seeds": TUNE_SEEDS,
        "max_trials": budget, "grid": len(grid), "fractions": ",".join(map(str, FRACTIONS)),
        "floor": FLOOR, "train_rows": ",".join(map(str, table.rows["train"])),
        "val_rows": ",".join(map(str, table.rows["val"])), "oracle_test": threshold,
        "oracle_ties": ties, "best_val": float(val.max()),
        "within_1pt": int((val >= val.max() - 1).sum()),
        "top10_val_spread": float(val.max() - np.sort(val)[-min(10, len(val))])}
    noise = TASKS[task][1]
    if noise:  # how the harder task's images were made
        summary.update({f"{MAKERS[task][0]}_{k}": v for k, v in noise.items()})
    if task == "digits":  # the last rung against the shipped grid, config by config
        ref = load_grid()
        common = [k for k in grid if k in ref]  # (the grid's 8 timesteps)
        summary["full_equals_grid"] = bool(common) and all(grid[k] == ref[k] for k in common)
    for k, r in enumerate(rho):
        summary[f"spearman_rung{k}"] = r
    for k, rank in enumerate(oracle_ranks(table)[:-1]):
        summary[f"oracle_rank_rung{k}"] = rank
    summary["spearman_probe"] = probe_spearman(table)
    runs = []
    with space_file(space_text(list(grid))) as path:
        rf = rf or int(load(path, seed=0, trials=1).search["reduction_factor"])
        summary["reduction_factor"] = rf
        for seed in seeds:
            runs.append(run_seed(path, table, seed, budget, threshold, rf))
    for arm in ARMS:
        col = {m: [r[arm][m] for r in runs] for m in runs[0][arm]}
        summary[f"{arm}_unanswered"] = sum(math.isinf(x) for x in col["passes"])
        summary[f"{arm}_kept_share"] = sum(not math.isinf(x) for x in col["kept_passes"]) \
            / len(runs)
        for m in ("passes", "seconds", "kept_passes", "search_passes"):
            med, lo, hi = median_ci(col[m])
            summary[f"{arm}_{m}"], summary[f"{arm}_{m}_lo"], summary[f"{arm}_{m}_hi"] = \
                med, lo, hi
        summary[f"{arm}_full_trials"] = float(np.mean(col["full_trials"]))
        summary[f"{arm}_final_test"] = float(np.nanmean(col["final_test"]))
    for arm, name in (("rungs", ""), ("probe", "probe_")):
        for m, key in (("passes", "pass_ratio"), ("seconds", "compute_ratio"),
                       ("kept_passes", "kept_pass_ratio"),
                       ("search_passes", "search_pass_ratio")):
            num = [r[arm][m] for r in runs]
            den = [r["flat"][m] for r in runs]
            v, lo, hi = median_ratio(num, den)
            summary[f"{name}{key}"], summary[f"{name}{key}_lo"], \
                summary[f"{name}{key}_hi"] = v, lo, hi
    summary["goal"] = "pass_ratio<=0.25"
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--first-seed", type=int, default=2000,
                    help="seeds first-seed .. first-seed + seeds - 1 (default 2000)")
    ap.add_argument("--max-trials", type=int, default=60,
                    help="each search's budget (its trials setting; default 60)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the per-rung table")
    ap.add_argument("--task", choices=sorted(TASKS), default="digits",
                    help="digits (the demo's); noisy: the harder task; augmented: 8 seeded "
                    "rotated, shifted, noisy copies of every digit (default digits)")
    ap.add_argument("--reduction-factor", type=int, default=None,
                    help="ASHA's over the rungs (default: the demo space's, 2)")
    ap.add_argument("--timesteps", choices=("space", "grid"), default="space",
                    help="space: the demo space's 51 (default); grid: the 8 of "
                    "optuna_vs_random's grid (the table's configs at those)")
    ap.add_argument("--rung-steps", type=int, default=DEFAULT_STEPS,
                    help="the fewest SGD steps of an early rung's epoch, as search.rung_steps "
                    f"(default {DEFAULT_STEPS}; 1: each rung's sample read once, a table of "
                    "its own)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes (one thread each) that build a table (default 1)")
    ap.add_argument("--tiny", metavar="DIR", default=None,
                    help="a tiny table (8 configs) built in DIR, no RESULTS row (tests)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: at least 1 process builds a table")
    configure()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if set(seeds) & set(seed_range(TUNE_SEEDS)):
        raise SystemExit(f"seeds overlap the tuning range {TUNE_SEEDS}")
    path, keys = TASKS[args.task][0], table_keys()
    if args.timesteps == "grid":
        keys = [k for k in keys if k[1] in GRID_TIMESTEPS]
    if args.rung_steps != DEFAULT_STEPS:  # another recipe: a table of its own
        path = path.with_name(f"{path.stem}_steps{args.rung_steps}_{args.timesteps}.json")
    if args.tiny:
        table = make_table(Path(args.tiny) / "tiny_rungs.json", tiny_keys(), args.task,
                           args.rung_steps, args.jobs)
    elif args.rebuild or not path.exists():
        table = make_table(path, keys, args.task, args.rung_steps, args.jobs)
    else:
        table = read_table(path)
    table = table.only(keys)
    load_start = os.getloadavg()[0]
    summary = report(table, seeds, args.max_trials, task=args.task, rf=args.reduction_factor)
    summary.update(timesteps=len({t for _, t, _ in table.scores}), rung_steps=args.rung_steps)
    summary["load_1min"] = f"{load_start:.1f}-{os.getloadavg()[0]:.1f}"  # the seconds' context
    if args.tiny:
        print(" ".join(["data_fidelity_tiny", *(f"{k}={v}" for k, v in summary.items())]))
    else:
        record("data_fidelity", **summary)
    return summary


if __name__ == "__main__":
    main()
