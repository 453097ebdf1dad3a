"""Heads trained per pass over the features: dinov2's 13 learning rates for a linear head on
one cached demo entry (block 10, t 90, pool 2), 28 epochs of the released recipe, trained

- batched: one trial with ``grid: {lr: [13 values]}`` (one pass per batch for all 13 heads),
- separate: 13 trials, one per learning rate, in one Tune search, one at a time: the same
  resources as the batched trial (one core, one torch thread), so that the ratio is what
  batching the heads saves; and again two at a time on the machine's 2 cores
  (``wall_ratio_2_concurrent``: at most 6.5 by construction),

all through difftune's trainable, Ray Tune and the MLflow recorder, with early stopping off
(every head trains 28 epochs) and the cache entry extracted before any is timed. Reports the
wall time of each search, the ratios, and the best val top-1 of each (on the CPU a head of a
grid computes bitwise what it computes alone, so they should agree). ``epoch_ratio``: 13 x a
separate trial's mean epoch (train, evaluate, checkpoint, report; its first epoch, which
holds the trial's start-up, left out) over the grid trial's: what batching saves once the
fixed costs of a search (Ray, imports, loading the U-Net and the data) are amortised.

    python -m benchmarks.batched_heads [--epochs 28]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("batched_heads")

#: dinov2's linear-evaluation learning rates (eval/linear.py)
LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
FIXED = dict(model="demo", data="digits", head="linear", block=10, t=90, pool=2,
             optimizer="sgd", momentum=0.0, weight_decay=0.0, batch_size=64, step_size=7,
             gamma=0.1)

SPACE = """
model: demo
data: digits
search: {{trials: 1, seed: 0, cpus_per_trial: 1, max_concurrent: 1, max_failures: 0,
          cache_pool: 4}}
fixed: {{head: linear, block: 10, t: 90, pool: 2, epochs: {epochs}}}
{grid}
"""


def search(work: Path, name: str, *, epochs: int, batched: bool, concurrent: int = 1
           ) -> tuple[float, float, list[tuple[dict, float]]]:
    """One Tune search; returns (wall seconds of fit, mean seconds of an epoch after a
    trial's first, [(last result, learning rate of the trial's best head)])."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from difftune.search.records.tracking import start_parent_run
    from difftune.search.run.trials import MLflowTrials
    from difftune.search.run.tuner import make_trainable
    from difftune.search.space.spec import load_space
    from difftune.trainables.trainable import RuntimeOptions

    path = work / f"{name}.yaml"
    path.write_text(SPACE.format(epochs=epochs,
                                 grid=f"grid: {{lr: {LRS}}}" if batched else ""))
    space = load_space(str(path))
    runtime = RuntimeOptions(cache=str(work / "cache"), store_pool=4, extra_blocks=(10,),
                             threads=1)
    uri = f"sqlite:///{work}/{name}.db"
    parent = start_parent_run(MlflowClient(uri), name, space_dict=space.resolved(),
                              runtime=runtime.to_dict(), tune_path="", model_name=name)
    config = {**FIXED, "epochs": epochs}
    if not batched:
        config["lr"] = tune.grid_search(LRS)
    tuner = tune.Tuner(
        make_trainable(space, runtime), param_space=config,
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent,
                                    metric="val_top1", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(work / "runs"), verbose=0,
                                  callbacks=[MLflowTrials(uri, parent)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise SystemExit(f"the {name} search failed: {errors[0]}")
    trial_s = sum(r.metrics["time_total_s"] for r in results)
    epochs_s = [t for r in results for t in list(r.metrics_dataframe["time_this_iter_s"])[1:]]
    epoch_s = sum(epochs_s) / len(epochs_s)
    logger.warning("%s: wall %.1f s, trials %.1f s, mean epoch %.3f s", name, wall, trial_s,
                   epoch_s)
    return wall, epoch_s, [(r.metrics, json.loads(r.metrics["grid_best"])["lr"] if batched
                            else r.config["lr"]) for r in results]


def warm_cache(root: Path) -> None:
    """Extract the one entry both searches read (not timed)."""
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.config import TrialConfig

    cfg = TrialConfig.from_dict({**FIXED, "lr": 0.01})
    cache = FeatureCache(str(root), store_pool=4, extra_blocks=[10])
    for split in ("train", "val"):
        cache.get(cfg, split, [(90, 10, 2)])


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--epochs", type=int, default=28)
    args = ap.parse_args()
    configure()
    import ray

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        warm_cache(work / "cache")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            wall_b, epoch_b, batched = search(work, "batched", epochs=args.epochs, batched=True)
            wall_s, epoch_s, separate = search(work, "separate", epochs=args.epochs,
                                               batched=False)
            wall_2, _, separate_2 = search(work, "separate2", epochs=args.epochs,
                                           batched=False, concurrent=2)
        finally:
            ray.shutdown()
    ((best_b, lr_b),) = batched
    # the best trial: the best val top-1, ties to the earlier trial (grid order, as the grid)
    best_s, lr_s = max(separate, key=lambda m: (m[0]["val_top1"], -LRS.index(m[1])))
    assert len(separate) == len(separate_2) == len(LRS) and best_b["grid_size"] == len(LRS)
    assert {lr: m["val_top1"] for m, lr in separate} == {lr: m["val_top1"] for m, lr in separate_2}
    record("batched_heads", heads=len(LRS), wall_ratio=wall_s / wall_b,
           best_top1_batched=best_b["val_top1"], best_top1_separate=best_s["val_top1"],
           best_lr_batched=lr_b, best_lr_separate=lr_s, wall_batched_s=wall_b,
           wall_separate_s=wall_s, wall_ratio_2_concurrent=wall_2 / wall_b,
           wall_separate_2_concurrent_s=wall_2, epoch_ratio=len(LRS) * epoch_s / epoch_b,
           epoch_s_batched=epoch_b, epoch_s_separate=epoch_s, epochs=args.epochs,
           load_1min_start=load_start,
           load_1min_end=os.getloadavg()[0], goal="wall_ratio>=6,best_within_0.5pt")


if __name__ == "__main__":
    main()
