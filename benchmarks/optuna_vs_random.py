"""Search quality (P3), measured where the searcher can be judged: difftune's Optuna search
(seeded multivariate TPE after the paper's config and a few startup trials, the constant
liar; :func:`difftune.search.run.tuner.sampler_for`) against random search, replayed over a
precomputed demo grid.

The grid: a linear head on the demo U-Net at every block 1..19 x t in the paper's sweep
{0, 10, 30, 50, 90, 150, 300, 500} x pool {1, 2, 4} (456 configs), each trained once on the
train split (4 epochs, SGD momentum 0.9, lr 0.05, ``difftune probe``'s recipe on the shipped
demo U-Net) and scored on val (what a search sees) and on test (what it is judged by). It is
stored in ``benchmarks/demo_grid.json`` (``--recompute`` rebuilds it, a few minutes).

Each search of budget N (5, 10, 20, 40 trials) asks its sampler for N configs exactly as
``difftune search`` does (the same space, define-by-run function, enqueued points and
sampler, and ``max_concurrent`` trials in flight: the sampler is asked for a trial while
the others still run, as OptunaSearch under Ray Tune is; trials finish in the order they
started, since every config trains the same epochs) and replays their scores. Two regrets:

- **val regret**, what the searcher optimises: the grid's best val minus the best val it
  found;
- **test regret**, what it is judged by: the grid's best test minus the test of its pick
  (the best val found, by :mod:`difftune.search.records.best`'s rule), beside the floor no
  choice by val can beat: the val-oracle, which trained all 456 and picked the best val (the
  mean test over the configs tied there).

Means and 95 % bootstrap intervals over the report seeds (the same seeds for every arm).
The sampler's settings (startup trials, the constant liar, multivariate TPE) were chosen on
seeds 0-1099 (``--tune`` replays the candidates on a tuning range and writes their val regret
as its own row); the report seeds must not overlap the tuning range. ASHA is not modelled
(the grid holds final scores only).

    python -m benchmarks.optuna_vs_random [--first-seed 2000] [--seeds 500]
        [--tune-seeds 0-1099] [--max-concurrent N] [--recompute]
    python -m benchmarks.optuna_vs_random --tune [--tune-seeds 0-99]
    python -m benchmarks.optuna_vs_random --sampler startup1_liar  # a candidate, reported
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna

from benchmarks._results import arguments, configure, mean_ci, record

logger = logging.getLogger("optuna_vs_random")

GRID_FILE = Path(__file__).resolve().parent / "demo_grid.json"
BLOCKS = list(range(1, 20))
TIMESTEPS = [0, 10, 30, 50, 90, 150, 300, 500]
POOLS = [1, 2, 4]
BUDGETS = (5, 10, 20, 40)
EPOCHS = 4  # the grid's recipe
PAPER = (10, 90, 2)  # the demo space's paper_config: middle block, t 90, pool 2
#: the seeds the shipped sampler settings were chosen on (issue history: 0-99, 100-1099,
#: 400-799); report seeds must lie outside
TUNE_SEEDS = "0-1099"
SPACE = f"""
model: demo
fixed: {{head: linear, epochs: {EPOCHS}, lr: 0.05, momentum: 0.9, batch_size: 64}}
params:
  block: {{int: [1, 19]}}
  t: {{choice: {TIMESTEPS}}}
  pool: {{choice: {POOLS}}}
paper_config: {{head: linear, block: {PAPER[0]}, t: {PAPER[1]}, pool: {PAPER[2]}}}
"""

Key = tuple[int, int, int]
Grid = dict[Key, dict[str, float]]
#: a sampler for a loaded space (or None: the space's own, difftune's TPE)
SamplerFactory = Callable[[object], optuna.samplers.BaseSampler]


# ------------------------------------------------------------------------------ the grid
def compute_grid() -> Grid:
    """Val and test top-1 of every (block, t, pool) of the grid."""
    from difftune.trainables.model.unet import load_unet
    from difftune.trainables.train.probe import probe_grid

    grid = probe_grid(load_unet("demo"), data="digits", blocks=BLOCKS, timesteps=TIMESTEPS,
                      pools=POOLS, epochs=EPOCHS, lr=0.05, progress=True, test=True)
    return {k: {"val": m["val_top1"], "test": m["test_top1"]} for k, m in grid.items()}


def load_grid(recompute: bool = False) -> Grid:
    if recompute or not GRID_FILE.exists():
        grid = compute_grid()
        rows = [{"block": b, "t": t, "pool": p, **v} for (b, t, p), v in sorted(grid.items())]
        GRID_FILE.write_text(json.dumps({"model": "demo", "data": "digits", "recipe":
                                         "linear probe, 4 epochs, lr 0.05, momentum 0.9",
                                         "configs": rows}, indent=0) + "\n")
    rows = json.loads(GRID_FILE.read_text())["configs"]
    return {(r["block"], r["t"], r["pool"]): {"val": r["val"], "test": r["test"]} for r in rows}


# ----------------------------------------------------------------- picks and regrets
def pick(grid: Grid, tried: Sequence[Key]) -> Key:
    """The config a search that ran ``tried`` (in finishing order) picks: the best val,
    ties to the earlier trial (:func:`difftune.search.records.best.best_trial`'s rule, all
    trials running the same epochs)."""
    from difftune.search.records.best import Candidate, best_trial

    cands = [Candidate(key=str(i), order=i, score=grid[k]["val"], epochs=EPOCHS, data=k)
             for i, k in enumerate(tried)]
    best = best_trial(cands, mode="max")
    if best is None:
        raise ValueError("no trial to pick from")
    return best.data


def picks(grid: Grid, tried: Sequence[Key]) -> list[Key]:
    """The pick after each of the first 1..len(tried) trials (the same rule as :func:`pick`,
    one pass)."""
    out: list[Key] = []
    for k in tried:
        if not out or grid[k]["val"] > grid[out[-1]]["val"]:
            out.append(k)
        else:
            out.append(out[-1])
    return out


def regret_on_val(grid: Grid, tried: Sequence[Key]) -> float:
    """The grid's best val minus the best val among ``tried``."""
    return max(v["val"] for v in grid.values()) - max(grid[k]["val"] for k in tried)


def regret_on_test(grid: Grid, tried: Sequence[Key]) -> float:
    """The grid's best test minus the test of the pick among ``tried``."""
    return max(v["test"] for v in grid.values()) - grid[pick(grid, tried)]["test"]


def oracle(grid: Grid) -> tuple[float, int]:
    """``(test, ties)``: the test a val-oracle's pick scores (it trained every config and
    picked the best val; with ties, the mean test over the tied configs: the order it would
    have run them in is arbitrary) and how many configs tie at the best val."""
    top = max(v["val"] for v in grid.values())
    tied = [v["test"] for v in grid.values() if v["val"] == top]
    return sum(tied) / len(tied), len(tied)


# ---------------------------------------------------------------------- the replay
@contextmanager
def space_file(text: str = SPACE) -> Iterator[str]:
    """A temporary YAML file holding the replayed space."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "space.yaml"
        path.write_text(text)
        yield str(path)


def load(path: str, *, seed: int, trials: int, max_concurrent: int | None = None,
         paper: bool = True, prior: bool = False):
    """The space of a search of ``trials`` trials with ``seed`` (``paper=False``: no enqueued
    points, random search's way)."""
    from difftune.search.space.spec import load_space

    overrides: dict[str, object] = {"seed": seed, "trials": trials,
                                    "max_concurrent": max_concurrent}
    if prior:
        overrides["prior"] = "paper"
    space = load_space(path, search_overrides=overrides)
    if not paper:
        space.paper_config = None
    return space


def replay(space, grid: Grid, sampler: optuna.samplers.BaseSampler, budget: int) -> list[Key]:
    """The configs a search of ``budget`` trials runs, in the order they finish, replaying
    their val scores from ``grid`` as the search's trials would report them."""
    from difftune.trainables.params import decode

    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in space.points_to_evaluate():
        study.enqueue_trial(point)
    tried: list[Key] = []
    running: list[tuple[optuna.trial.Trial, Key]] = []
    concurrent = int(space.search["max_concurrent"])
    while len(tried) < budget:
        while len(running) < concurrent and len(tried) + len(running) < budget:
            trial = study.ask()
            cfg = decode({**space.define_by_run(trial), **trial.params})
            running.append((trial, (cfg["block"], cfg["t"], cfg["pool"])))
        trial, key = running.pop(0)  # the oldest running trial finishes first
        study.tell(trial, grid[key]["val"])
        tried.append(key)
    return tried


def tpe(space) -> optuna.samplers.BaseSampler:
    """difftune's sampler for ``space``, exactly as a search builds it."""
    from difftune.search.run.tuner import sampler_for

    return sampler_for(space)


def tpe_with(startup: int, liar: bool) -> SamplerFactory:
    """A candidate TPE (for ``--tune``): difftune's, with ``startup`` startup trials and the
    constant liar on or off."""
    def make(space) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=int(space.search["seed"]), multivariate=True, group=True,
                constant_liar=liar, n_startup_trials=startup)
    return make


def run_arm(path: str, grid: Grid, arm: str, seed: int, budget: int,
            max_concurrent: int | None = None,
            factory: SamplerFactory | None = None) -> list[Key]:
    """The trials of one search: ``arm`` is ``tpe`` (difftune's search, or ``factory``'s
    sampler on the same space), ``tpe_prior`` (startup points from the paper's prior) or
    ``random`` (random search: no enqueued points)."""
    if arm == "random":
        space = load(path, seed=seed, trials=budget, max_concurrent=max_concurrent,
                     paper=False)
        return replay(space, grid, optuna.samplers.RandomSampler(seed=seed), budget)
    space = load(path, seed=seed, trials=budget, max_concurrent=max_concurrent,
                 prior=arm == "tpe_prior")
    return replay(space, grid, (factory or tpe)(space), budget)


# ------------------------------------------------------------------------ intervals
def seed_range(text: str) -> range:
    """``"A-B"`` -> seeds A..B."""
    a, _, b = text.partition("-")
    return range(int(a), int(b or a) + 1)


def ratio_ci(num: Sequence[float], den: Sequence[float], *, reps: int = 10000,
             seed: int = 0) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` and its 95 % paired bootstrap interval over seeds."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(reps, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    point = float(a.mean() / b.mean()) if b.mean() else math.inf
    r = r[~np.isnan(r)]  # resamples where both means are 0
    return point, float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def put(summary: dict[str, object], name: str, values: Sequence[float]) -> None:
    """``name``, ``name_lo``, ``name_hi``: the mean of ``values`` and its 95 % interval."""
    mean, lo, hi = mean_ci(values)
    summary[name], summary[f"{name}_lo"], summary[f"{name}_hi"] = mean, lo, hi


# ---------------------------------------------------------------------------- runs
def tune(grid: Grid, seeds: range, max_concurrent: int | None, budget: int = 20) -> None:
    """Replay candidate sampler settings on ``seeds`` and record their mean val regret at
    ``budget`` trials (the objective the searcher optimises; test is never looked at)."""
    from difftune.search.space.distributions import startup_trials

    shipped = startup_trials(budget)
    summary: dict[str, object] = {"tune_seeds": f"{seeds.start}-{seeds.stop - 1}",
                                  "budget": budget, "shipped_startup": shipped}
    best: tuple[float, str] | None = None
    with space_file() as path:
        for startup in sorted({1, shipped, 5, 10}):
            for liar in (True, False):
                name = f"startup{startup}_{'liar' if liar else 'noliar'}"
                regrets = [regret_on_val(grid, run_arm(path, grid, "tpe", s, budget,
                                                    max_concurrent, tpe_with(startup, liar)))
                           for s in seeds]
                put(summary, f"{name}_val_regret{budget}", regrets)
                mean = float(np.mean(regrets))
                logger.warning("%s: val regret %.3f", name, mean)
                best = min(best, (mean, name)) if best else (mean, name)
    assert best is not None
    summary["best"] = best[1]
    summary["shipped"] = f"startup{shipped}_liar"
    record("optuna_vs_random_tune", **summary)


def factory_named(name: str | None) -> SamplerFactory | None:
    """``startupN_liar`` / ``startupN_noliar`` (a ``--tune`` candidate) -> its sampler; None
    or ``shipped``: difftune's own."""
    if name in (None, "shipped"):
        return None
    head, _, liar = name.partition("_")
    if not head.startswith("startup") or liar not in ("liar", "noliar"):
        raise SystemExit(f"--sampler {name!r}: allowed: shipped, startupN_liar, startupN_noliar")
    return tpe_with(int(head[len("startup"):]), liar == "liar")


def report(grid: Grid, seeds: range, tune_seeds: str, max_concurrent: int | None,
           sampler: str | None = None) -> None:
    """Val and test regret of TPE (difftune's, or the ``--tune`` candidate ``sampler``) and
    random search on ``seeds`` (one row)."""
    factory = factory_named(sampler)
    overlap = set(seeds) & set(seed_range(tune_seeds))
    if overlap:
        raise SystemExit(f"--first-seed/--seeds overlap the tuning seeds {tune_seeds} "
                         f"(e.g. {min(overlap)}): report on seeds never used for tuning")
    best_test = max(v["test"] for v in grid.values())
    oracle_test, ties = oracle(grid)
    arms = ("tpe", "random") + (("tpe_prior",) if factory is None else ())
    val: dict[tuple[str, int], list[float]] = {}
    test: dict[tuple[str, int], list[float]] = {}
    with space_file() as path:
        concurrent = load(path, seed=0, trials=1, max_concurrent=max_concurrent
                          ).search["max_concurrent"]
        for budget in BUDGETS:
            for seed in seeds:
                for arm in arms:
                    if arm == "tpe_prior" and budget != 20:
                        continue
                    tried = run_arm(path, grid, arm, seed, budget, max_concurrent,
                                    factory if arm == "tpe" else None)
                    val.setdefault((arm, budget), []).append(regret_on_val(grid, tried))
                    test.setdefault((arm, budget), []).append(regret_on_test(grid, tried))
            logger.warning("budget %d done", budget)
    summary: dict[str, object] = {
        "tune_seeds": tune_seeds, "report_seeds": f"{seeds.start}-{seeds.stop - 1}",
        "sampler": sampler or "shipped",
        "grid": len(grid), "max_concurrent": concurrent,
        "grid_best_val": max(v["val"] for v in grid.values()), "grid_best_test": best_test,
        "oracle_test_regret": best_test - oracle_test, "oracle_ties": ties,
        "paper_val_regret": regret_on_val(grid, [PAPER]),
        "paper_test_regret": regret_on_test(grid, [PAPER])}
    for budget in BUDGETS:
        for arm in arms:
            if (arm, budget) not in val:
                continue
            put(summary, f"{arm}_val_regret{budget}", val[arm, budget])
            put(summary, f"{arm}_test_regret{budget}", test[arm, budget])
        for kind, table in (("val", val), ("test", test)):
            r, lo, hi = ratio_ci(table["tpe", budget], table["random", budget])
            summary[f"{kind}_ratio{budget}"] = r
            summary[f"{kind}_ratio{budget}_lo"], summary[f"{kind}_ratio{budget}_hi"] = lo, hi
        print(f"budget {budget:>2}: val tpe {np.mean(val['tpe', budget]):.2f} random "
              f"{np.mean(val['random', budget]):.2f}; test tpe {np.mean(test['tpe', budget]):.2f}"
              f" random {np.mean(test['random', budget]):.2f}", flush=True)
    record("optuna_vs_random", **summary)


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--seeds", type=int, default=500, help="report seeds (default 500)")
    ap.add_argument("--first-seed", type=int, default=2000,
                    help="report seeds first-seed .. first-seed + seeds - 1 (default 2000)")
    ap.add_argument("--tune-seeds", default=None,
                    help=f"the tuning range A-B (default: {TUNE_SEEDS} when reporting, the "
                         "seeds the shipped settings were chosen on; 0-99 with --tune)")
    ap.add_argument("--tune", action="store_true",
                    help="replay candidate sampler settings on --tune-seeds instead")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="trials in flight (default: the space's search.max_concurrent, 2)")
    ap.add_argument("--sampler", default=None,
                    help="the TPE arm: shipped (difftune's sampler_for, the default) or a "
                         "--tune candidate such as startup1_liar")
    ap.add_argument("--recompute", action="store_true", help="rebuild the grid")
    args = ap.parse_args()
    configure()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = load_grid(args.recompute)
    if args.tune:
        tune(grid, seed_range(args.tune_seeds or "0-99"), args.max_concurrent)
    else:
        report(grid, range(args.first_seed, args.first_seed + args.seeds),
               args.tune_seeds or TUNE_SEEDS, args.max_concurrent, args.sampler)


if __name__ == "__main__":
    main()
