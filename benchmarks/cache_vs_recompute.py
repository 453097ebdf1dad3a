"""P1: the same linear-head search on the demo, with the Arrow feature cache and with
``--no-cache`` (the paper's behaviour: the U-Net reruns on every batch of every epoch with
fresh noise). Counts the images passed through the U-Net (each trial reports its source's
instrumented count as ``unet_images``) and the wall time of each search, in one run.

Early stopping is off (ASHA's grace period = epochs) so that both searches train exactly the
same number of epochs; one trial runs at a time so that both see the same trial sequence.

    python -m benchmarks.cache_vs_recompute [--trials 12] [--epochs 28]
"""

from __future__ import annotations

import logging
import tempfile
import time
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


def run(space_path: str, work: Path, *, no_cache: bool) -> tuple[int, float, int]:
    """Run one search; returns (U-Net image-passes, wall seconds, distinct timesteps)."""
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
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("difftune.role") == "trial"]
    images = sum(int(r.data.metrics.get("unet_images", 0)) for r in runs)
    distinct_t = len({r.data.params["t"] for r in runs})
    return images, wall, distinct_t


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=28)
    args = ap.parse_args()
    configure()
    import ray

    from difftune.trainables.data.datasets import load_dataset

    n_images = sum(len(load_dataset("digits", split=s, image_size=16)[0]) for s in ("train", "val"))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        space = work / "space.yaml"
        space.write_text(SPACE.format(trials=args.trials, epochs=args.epochs,
                                      timesteps=TIMESTEPS))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            cached, wall_cached, distinct_t = run(str(space), work, no_cache=False)
            online, wall_online, _ = run(str(space), work, no_cache=True)
        finally:
            ray.shutdown()
    record("cache_vs_recompute", trials=args.trials, epochs=args.epochs,
           unet_images_cache=cached, unet_images_nocache=online,
           limit=n_images * distinct_t, image_pass_ratio=online / max(cached, 1),
           wall_cache_s=wall_cached, wall_nocache_s=wall_online,
           wall_ratio=wall_online / wall_cached, goal="ratio>=30x_images,>=5x_wall")


if __name__ == "__main__":
    main()
