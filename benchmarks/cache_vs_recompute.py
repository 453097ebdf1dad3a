"""P1: the same linear-head search on the demo, with the Arrow feature cache and with
``--no-cache`` (the paper's behaviour: the U-Net reruns on every batch of every epoch with
fresh noise). Counts the images passed through the U-Net (each trial reports its source's
instrumented count as ``unet_images``) and the wall time of each search, in one run.

Both searches run the same list of trial configs: the list is drawn once (a seeded random
sample of the space, Optuna's ``RandomSampler``) and replayed in each search as the points
Optuna evaluates first (every trial is one of them; the sampler never proposes), so the wall
ratio compares the same work, whatever the trials report. The row checks it
(``same_configs``) and names the list (``configs_sha``). Early stopping is off (ASHA's grace
period = epochs) so both train exactly the same epochs; one trial runs at a time. The
recompute arm gets what the cache arm gets: the same threads per trial, early exit at the
trial's block, the same batch.

    python -m benchmarks.cache_vs_recompute [--trials 8] [--epochs 7] [--seed 0]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("cache_vs_recompute")

TIMESTEPS = [0, 10, 30, 50, 90, 150, 300, 500]  # the paper's sweep

SPACE = """
model: demo
data: digits
search: {{trials: {trials}, seed: 0, max_concurrent: 1, grace_period: {epochs},
          cpus_per_trial: 2, max_failures: 0, cache_pool: 4}}
fixed: {{head: linear, epochs: {epochs}, step_size: 7, gamma: 0.1, batch_size: 64,
         optimizer: sgd, momentum: 0.0}}
params:
  block: {{int: [1, 19]}}
  t: {{choice: {timesteps}}}
  pool: {{choice: [1, 2, 4]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


def draw_points(space_path: str, n: int, seed: int) -> list[dict]:
    """``n`` Optuna points of the space, drawn by a seeded ``RandomSampler`` through the
    space's own define-by-run function (so each is a point the search could propose)."""
    import optuna

    from difftune.search.space.spec import load_space

    space = load_space(space_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        space.define_by_run(trial)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)
    return points


def replaying(points: list[dict]):
    """A context in which every search evaluates ``points`` first (the space's
    ``points_to_evaluate``, which OptunaSearch enqueues in order)."""
    import contextlib

    from difftune.search.space.spec import Space

    @contextlib.contextmanager
    def ctx():
        saved = Space.points_to_evaluate
        Space.points_to_evaluate = lambda self: [dict(p) for p in points]
        try:
            yield
        finally:
            Space.points_to_evaluate = saved

    return ctx()


def run(space_path: str, work: Path, *, no_cache: bool) -> tuple[int, float, list[dict]]:
    """Run one search; returns (U-Net image-passes, wall seconds, trial params in order)."""
    from mlflow.tracking import MlflowClient

    from difftune.search.cli import main

    name = "nocache" if no_cache else "cache"
    uri = f"sqlite:///{work}/{name}.db"
    argv = ["search", "--space", space_path, "--experiment", name, "--tracking-uri", uri,
            "--storage", str(work / f"runs-{name}")]
    argv += ["--no-cache"] if no_cache else ["--cache", str(work / "cache")]
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"the {name} search failed")
    wall = time.perf_counter() - start
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000,
                                          order_by=["attributes.start_time ASC"])
            if r.data.tags.get("difftune.role") == "trial"]
    images = sum(int(r.data.metrics.get("unet_images", 0)) for r in runs)
    params = [{k: r.data.params.get(k) for k in ("block", "t", "pool", "lr")} for r in runs]
    return images, wall, params


def as_keys(points: list[dict]) -> list[tuple]:
    """Comparable (block, t, pool, lr) tuples of points or MLflow params (strings)."""
    return sorted((int(p["block"]), int(p["t"]), int(p["pool"]), round(float(p["lr"]), 9))
                  for p in points)


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0, help="seed of the drawn config list")
    args = ap.parse_args()
    configure()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import ray

    from difftune.trainables.data.datasets import load_dataset

    n_images = sum(len(load_dataset("digits", split=s, image_size=16)[0]) for s in ("train", "val"))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        space = work / "space.yaml"
        space.write_text(SPACE.format(trials=args.trials, epochs=args.epochs,
                                      timesteps=TIMESTEPS))
        points = draw_points(str(space), args.trials, args.seed)
        sha = hashlib.sha256(json.dumps(points, sort_keys=True).encode()).hexdigest()[:12]
        logger.info("configs %s: %s", sha, points)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        load_start = os.getloadavg()[0]
        try:
            with replaying(points):
                cached, wall_cached, params_cached = run(str(space), work, no_cache=False)
                online, wall_online, params_online = run(str(space), work, no_cache=True)
        finally:
            ray.shutdown()
        load_end = os.getloadavg()[0]
    same = as_keys(params_cached) == as_keys(params_online) == as_keys(points)
    distinct_t = len({p["t"] for p in points})
    record("cache_vs_recompute", trials=args.trials, epochs=args.epochs,
           configs=f"random_seed{args.seed}_sha{sha}", same_configs=same,
           unet_images_cache=cached, unet_images_nocache=online,
           limit=n_images * distinct_t, image_pass_ratio=online / max(cached, 1),
           wall_cache_s=wall_cached, wall_nocache_s=wall_online,
           wall_ratio=wall_online / wall_cached, load_1min_start=load_start,
           load_1min_end=load_end, goal="ratio>=30x_images,>=5x_wall")
    if not same:
        raise SystemExit("the two searches did not run the drawn configs: see the row")


if __name__ == "__main__":
    main()
