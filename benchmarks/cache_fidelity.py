"""What the feature cache costs (or gains) in accuracy against the paper's way, on the demo.

The paper trains on a fresh noise draw of a fresh random crop + flip of every image at every
forward pass (``--no-cache``: the online source). The cache stores K views per (train image,
t) (``views: K``; view 0 is the image itself with its seeded noise, views 1..K-1 seeded crops +
flips with their own noise; epoch e reads view e mod K). This script trains the same 6
configs (a linear and an MLP head on blocks 7, 10 and 13 of the demo U-Net at t 90, pool 2,
the demo space's recipe: 4 epochs, SGD momentum 0.9, batch 64) with 3 seeds (head init, batch
order and noise seed) each way: online, cached K = 1 and cached K = 4, and reports the test
top-1 of each (the test split, evaluated once per trained head). The last line gives each
mean with its 95 % bootstrap interval over the 18 runs, and the paired differences of the
cached ways to the paper's way.

    python -m benchmarks.cache_fidelity [--seeds 3] [--epochs 4]
"""

from __future__ import annotations

import logging
import tempfile
import time

from benchmarks._results import arguments, configure, mean_ci, record

logger = logging.getLogger("cache_fidelity")

BLOCKS = (7, 10, 13)
HEADS = ({"head": "linear"}, {"head": "mlp", "hidden": [256]})
RECIPE = {"t": 90, "pool": 2, "epochs": 4, "step_size": 3, "batch_size": 64, "lr": 0.05,
          "optimizer": "sgd", "momentum": 0.9}
WAYS = ("online", "cached1", "cached4")


def score(cfg, way: str, cache_root: str) -> float:
    """Train ``cfg`` the ``way`` asked and evaluate it once on the test split."""
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.model.online import OnlineFeatures
    from difftune.trainables.pipeline import evaluate_on, run_trial

    source = OnlineFeatures() if way == "online" else FeatureCache(cache_root)
    head, _ = run_trial(cfg, source=source)
    return evaluate_on(head, cfg, "test", source=source)["test_top1"]


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = ap.parse_args()
    configure()
    from difftune.trainables.config import TrialConfig

    scores: dict[str, list[float]] = {w: [] for w in WAYS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_root:
        for head in HEADS:
            for block in BLOCKS:
                for seed in range(args.seeds):
                    for way in WAYS:
                        views = 4 if way == "cached4" else 1
                        cfg = TrialConfig(**{**RECIPE, **head, "epochs": args.epochs,
                                             "block": block, "seed": seed,
                                             "noise_seed": seed, "views": views})
                        scores[way].append(score(cfg, way, cache_root))
                    print(f"{head['head']:>6} block {block:>2} seed {seed}: " + "  ".join(
                        f"{w} {scores[w][-1]:.2f}" for w in WAYS), flush=True)
    summary: dict[str, object] = {"configs": len(HEADS) * len(BLOCKS), "seeds": args.seeds,
                                  "epochs": args.epochs}
    for way in WAYS:
        mean, lo, hi = mean_ci(scores[way])
        summary.update({f"{way}_top1": mean, f"{way}_lo": lo, f"{way}_hi": hi})
    for way in ("cached1", "cached4"):
        diff = [c - o for c, o in zip(scores[way], scores["online"], strict=True)]
        mean, lo, hi = mean_ci(diff)
        summary.update({f"{way}_minus_online": mean, f"{way}_minus_online_lo": lo,
                        f"{way}_minus_online_hi": hi})
    summary["wall_s"] = time.perf_counter() - start
    summary["split"] = "test"
    record("cache_fidelity", **summary)


if __name__ == "__main__":
    main()
