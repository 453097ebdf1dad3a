"""Trials Optuna (difftune's seeded multivariate TPE) needs to come within 1 point of the best
config of the full grid, against random search, on the demo problem (median over seeds).

The grid: linear head on the demo U-Net, blocks 1..19 x t in the paper's sweep
{0, 10, 30, 50, 90, 150, 300, 500} x pool {1, 2, 4} (456 configs), each trained once
(4 epochs, SGD momentum 0.9, lr 0.05) on cached features; the searches then replay the
grid's accuracies, so both samplers see exactly the same objective.

    python benchmarks/optuna_vs_random.py [--seeds 20] [--max-trials 200]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import record  # noqa: E402

logger = logging.getLogger("optuna_vs_random")

TIMESTEPS = [0, 10, 30, 50, 90, 150, 300, 500]
POOLS = [1, 2, 4]
SPACE = f"""
model: demo
fixed: {{head: linear, epochs: 4, lr: 0.05, momentum: 0.9, batch_size: 64}}
params:
  block: {{int: [1, 19]}}
  t: {{choice: {TIMESTEPS}}}
  pool: {{choice: {POOLS}}}
"""


def grid_accuracy() -> dict[tuple[int, int, int], float]:
    """Val top-1 of every (block, t, pool) of the grid (``difftune probe``'s recipe)."""
    from difftune.trainables.probe import probe_grid
    from difftune.trainables.unet import load_unet

    grid = probe_grid(load_unet("demo"), data="digits", blocks=range(1, 20),
                      timesteps=TIMESTEPS, pools=POOLS, epochs=4, lr=0.05, progress=True)
    return {k: m["val_top1"] for k, m in grid.items()}


def trials_to_reach(space, table, target: float, sampler, max_trials: int) -> int:
    from difftune.trainables.params import decode

    study = optuna.create_study(direction="maximize", sampler=sampler)
    for n in range(1, max_trials + 1):
        trial = study.ask()
        cfg = decode({**space.define_by_run(trial), **trial.params})
        value = table[(cfg["block"], cfg["t"], cfg["pool"])]
        study.tell(trial, value)
        if value >= target:
            return n
    return max_trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--max-trials", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from difftune.search.space import load_space
    from difftune.search.tuner import sampler_for

    table = grid_accuracy()
    best = max(table.values())
    target = best - 1.0
    within = sum(v >= target for v in table.values())
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(SPACE)
    tpe, rnd = [], []
    for seed in range(args.seeds):
        space = load_space(f.name, search_overrides={"seed": seed, "trials": 20})
        tpe.append(trials_to_reach(space, table, target, sampler_for(space), args.max_trials))
        rnd.append(trials_to_reach(space, table, target,
                                   optuna.samplers.RandomSampler(seed=seed), args.max_trials))
    Path(f.name).unlink()
    record("optuna_vs_random", grid=len(table), grid_best=best, configs_within_1pt=within,
           seeds=args.seeds, tpe_median_trials=statistics.median(tpe),
           random_median_trials=statistics.median(rnd),
           ratio=statistics.median(rnd) / statistics.median(tpe))


if __name__ == "__main__":
    main()
