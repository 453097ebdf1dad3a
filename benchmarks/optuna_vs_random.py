"""Search quality, measured honestly: the test regret of the config a search picks by val,
difftune's Optuna search (seeded multivariate TPE after the paper's config and a few startup
trials) against random search and against the paper's config alone, on a precomputed demo
grid; and the same TPE with its startup trials drawn from the paper's prior (``search:
{prior: paper}``: middle blocks, t 50-300).

The grid: a linear head on the demo U-Net at every block 1..19 x t in the paper's sweep
{0, 10, 30, 50, 90, 150, 300, 500} x pool {1, 2, 4} (456 configs), each trained once on the
train split (4 epochs, SGD momentum 0.9, lr 0.05, ``difftune probe``'s recipe on the shipped
demo U-Net) and scored on val (what a search sees) and on test (what it is judged by). It is
stored in ``benchmarks/demo_grid.json`` (``--recompute`` rebuilds it, a few minutes).

Each search of budget N (5, 10, 20, 40 trials) asks its sampler for N configs exactly as
``difftune search`` does (the same space, define-by-run function, enqueued points and
sampler, and ``max_concurrent`` trials in flight: the sampler is asked for a trial while
the others still run, as OptunaSearch under Ray Tune is; trials finish in the order they
started, since every config trains the same epochs), replays their val scores, and picks
the best by :mod:`difftune.search.records.best`'s rule. Its regret is the grid's best test score
minus the test score of its pick. Over ``--seeds`` seeds (the same seeds for every method):
the mean regret and its 95 % bootstrap interval (10,000 resamples). ASHA is not modelled
(the grid holds final scores only).

Two references: the paper's config alone, and an *informed* search that already knows the
val ranking and draws its N trials from the 40 configs best by val (then picks by val like
the others): what any sampler could reach by val alone, the floor set by the noise of the
small val and test splits.

    python -m benchmarks.optuna_vs_random [--seeds 100] [--first-seed 0] [--max-concurrent N]
        [--recompute]
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import optuna

from benchmarks._results import arguments, configure, mean_ci, record

logger = logging.getLogger("optuna_vs_random")

GRID_FILE = Path(__file__).resolve().parent / "demo_grid.json"
BLOCKS = list(range(1, 20))
TIMESTEPS = [0, 10, 30, 50, 90, 150, 300, 500]
POOLS = [1, 2, 4]
BUDGETS = (5, 10, 20, 40)
PAPER = (10, 90, 2)  # the demo space's paper_config: middle block, t 90, pool 2
SPACE = f"""
model: demo
fixed: {{head: linear, epochs: 4, lr: 0.05, momentum: 0.9, batch_size: 64}}
params:
  block: {{int: [1, 19]}}
  t: {{choice: {TIMESTEPS}}}
  pool: {{choice: {POOLS}}}
paper_config: {{head: linear, block: {PAPER[0]}, t: {PAPER[1]}, pool: {PAPER[2]}}}
"""

Grid = dict[tuple[int, int, int], dict[str, float]]


def compute_grid() -> Grid:
    """Val and test top-1 of every (block, t, pool) of the grid."""
    from difftune.trainables.model.unet import load_unet
    from difftune.trainables.train.probe import probe_grid

    grid = probe_grid(load_unet("demo"), data="digits", blocks=BLOCKS, timesteps=TIMESTEPS,
                      pools=POOLS, epochs=4, lr=0.05, progress=True, test=True)
    return {k: {"val": m["val_top1"], "test": m["test_top1"]} for k, m in grid.items()}


def load_grid(recompute: bool) -> Grid:
    if recompute or not GRID_FILE.exists():
        grid = compute_grid()
        rows = [{"block": b, "t": t, "pool": p, **v} for (b, t, p), v in sorted(grid.items())]
        GRID_FILE.write_text(json.dumps({"model": "demo", "data": "digits", "recipe":
                                         "linear probe, 4 epochs, lr 0.05, momentum 0.9",
                                         "configs": rows}, indent=0) + "\n")
    rows = json.loads(GRID_FILE.read_text())["configs"]
    return {(r["block"], r["t"], r["pool"]): {"val": r["val"], "test": r["test"]} for r in rows}


def search(space, grid: Grid, sampler, budget: int) -> tuple[int, int, int]:
    """The config a search of ``budget`` trials picks by val (difftune's rule for "best")."""
    from difftune.search.records.best import Candidate, best_trial
    from difftune.trainables.params import decode

    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in space.points_to_evaluate():
        study.enqueue_trial(point)
    tried: list[Candidate] = []
    running: list[tuple[optuna.trial.Trial, tuple[int, int, int]]] = []
    concurrent = int(space.search["max_concurrent"])
    while len(tried) < budget:
        while len(running) < concurrent and len(tried) + len(running) < budget:
            trial = study.ask()
            cfg = decode({**space.define_by_run(trial), **trial.params})
            running.append((trial, (cfg["block"], cfg["t"], cfg["pool"])))
        trial, key = running.pop(0)  # the oldest running trial finishes first
        study.tell(trial, grid[key]["val"])
        n = len(tried)
        tried.append(Candidate(key=str(n), order=n, score=grid[key]["val"], epochs=4, data=key))
    return best_trial(tried, mode="max").data


def informed(grid: Grid, budget: int, seed: int, top: int = 40) -> tuple[int, int, int]:
    """The pick of a search that knows the val ranking: ``budget`` configs drawn from the
    ``top`` best by val, the best of them by val (ties: a seeded draw)."""
    import random

    rng = random.Random(seed)
    ranked = sorted(grid, key=lambda k: -grid[k]["val"])[:top]
    drawn = rng.sample(ranked, min(budget, top))
    best = max(grid[k]["val"] for k in drawn)
    return rng.choice([k for k in drawn if grid[k]["val"] == best])


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed .. first-seed + seeds - 1 (default 0)")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="trials in flight (default: the space's search.max_concurrent, 2)")
    ap.add_argument("--recompute", action="store_true", help="rebuild the grid")
    args = ap.parse_args()
    configure()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from difftune.search.run.tuner import sampler_for
    from difftune.search.space.spec import load_space

    grid = load_grid(args.recompute)
    best_test = max(v["test"] for v in grid.values())
    top_val = max(v["val"] for v in grid.values())
    tied = [v["test"] for v in grid.values() if v["val"] == top_val]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(SPACE)
    names = ("tpe", "random", "tpe_prior", "informed")
    regret: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    for budget in BUDGETS:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            overrides = {"seed": seed, "trials": budget, "max_concurrent": args.max_concurrent}
            space = load_space(f.name, search_overrides=overrides)
            prior = load_space(f.name, search_overrides={**overrides, "prior": "paper"})
            plain = load_space(f.name, search_overrides=overrides)
            plain.paper_config = None  # random search: no enqueued points either
            picks = {"tpe": search(space, grid, sampler_for(space), budget),
                     "tpe_prior": search(prior, grid, sampler_for(prior), budget),
                     "random": search(plain, grid, optuna.samplers.RandomSampler(seed=seed),
                                      budget),
                     "informed": informed(grid, budget, seed)}
            for name, pick in picks.items():
                regret[name].setdefault(budget, []).append(best_test - grid[pick]["test"])
    Path(f.name).unlink()
    summary: dict[str, object] = {"seeds": args.seeds, "first_seed": args.first_seed,
                                  "grid": len(grid),
                                  "max_concurrent": space.search["max_concurrent"],
                                  "grid_best_test": best_test,
                                  # a search that trained all 456 and picked by val: the
                                  # mean regret over the configs tied at the best val score
                                  "oracle_regret": best_test - sum(tied) / len(tied),
                                  "oracle_ties": len(tied),
                                  "paper_regret": best_test - grid[PAPER]["test"]}
    for budget in BUDGETS:
        cells = []
        for name in names:
            mean, lo, hi = mean_ci(regret[name][budget])
            cells.append(f"{name} {mean:.2f} [{lo:.2f}, {hi:.2f}]")
            if name in ("tpe", "random") or budget == 20:
                summary[f"{name}_regret{budget}"] = mean
                summary[f"{name}_regret{budget}_lo"] = lo
                summary[f"{name}_regret{budget}_hi"] = hi
        print(f"budget {budget:>2}: " + "  ".join(cells), flush=True)
    summary["ratio20"] = summary["tpe_regret20"] / max(summary["random_regret20"], 1e-9)
    summary["intervals_apart20"] = summary["tpe_regret20_hi"] < summary["random_regret20_lo"]
    summary["goal"] = "tpe_regret20<=0.6x_random,intervals_apart"
    record("optuna_vs_random", **summary)


if __name__ == "__main__":
    main()
