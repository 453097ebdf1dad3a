"""What the feature cache costs (or gains) in accuracy against the paper's way, on the demo,
separated into its causes: five ways of training the same heads, each evaluated once on the
same test features.

- ``paper``: the paper's way (``--no-cache``, :mod:`difftune.trainables.model.online`): a
  fresh noise draw of a fresh random crop + flip of every image at every forward pass.
- ``fresh``: a fresh noise draw at every pass, without the crop + flip (what augmentation
  adds online: ``paper - fresh``).
- ``cached1``: the cache as a search reads it by default: one seeded noise draw of each image
  (``views: 1``), read at every epoch (what freezing the noise costs: ``cached1 - fresh``).
- ``drawsK``: K cached noise draws of each image without augmentation (the cache's entries
  of K noise seeds; epoch e reads draw e mod K, draw 0 being ``cached1``'s): what K draws
  win back without augmentation.
- ``viewsK``: K cached augmented views (``views: K``, :mod:`difftune.trainables.data.views`:
  view 0 is ``cached1``'s entry, views 1..K-1 seeded crops + flips with their own noise).

Every head is trained with the demo space's recipe (SGD momentum 0.9, batch 64, t 90, pool 2)
on a config (a linear or an MLP head on block 7, 10 or 13) and a seed (head init, batch
order, noise seed), then evaluated once on the test split read from the cache (the seed's
noise draw, stored float16), the same features for every way. The runs of one config are not
independent, so every interval is a 95 % percentile bootstrap over configs (configs are
resampled, each with the mean of its seeds), and the differences to ``paper`` are paired by
(config, seed).

    python -m benchmarks.cache_fidelity [--configs 6] [--seeds 2] [--epochs 4] [--views 4]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

import numpy as np

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("cache_fidelity")

CONFIGS = [({"head": head, **extra}, block) for head, extra in
           (("linear", {}), ("mlp", {"hidden": [256]})) for block in (7, 10, 13)]
RECIPE = {"t": 90, "pool": 2, "epochs": 4, "step_size": 3, "batch_size": 64, "lr": 0.05,
          "optimizer": "sgd", "momentum": 0.9}


def config_ci(cells: np.ndarray, *, reps: int = 10000, seed: int = 0
              ) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a configs x seeds table: the mean of every cell and the 95 %
    percentile bootstrap interval of it when configs (rows, each the mean of its seeds) are
    resampled with replacement."""
    rows = np.asarray(cells, dtype=float).mean(axis=1)
    rng = np.random.default_rng(seed)
    means = rows[rng.integers(0, len(rows), size=(reps, len(rows)))].mean(axis=1)
    return float(rows.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def draw_seed(noise_seed: int, k: int, draws: int) -> int:
    """The noise seed of draw ``k`` of a run with ``noise_seed``: draw 0 is the run's own
    (``cached1``'s entry), the others never collide with any run's own seed."""
    return noise_seed if k == 0 else 10_000 + noise_seed * draws + k


def sources(cache_root: str, draws: int) -> dict:
    """Arm name -> a function of nothing returning that arm's feature source."""
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.data.views import ViewCycle
    from difftune.trainables.model.online import OnlineFeatures, OnlineHead
    from difftune.trainables.pipeline import SPLITS, TrialData

    class NoAugHead(OnlineHead):
        """The online head without its crop + flip: ``OnlineHead`` augments only while its
        own ``training`` flag is set, so the flag is cleared around the pass (the head
        inside keeps its own mode); the noise is still drawn fresh at every pass."""

        def forward(self, inputs):
            training, self.training = self.training, False
            try:
                return super().forward(inputs)
            finally:
                self.training = training

    class FreshNoise(OnlineFeatures):
        def prepare(self, cfg, requests, splits=SPLITS):
            data = super().prepare(cfg, requests, splits)
            extractor = self.extractor
            data.wrap = lambda head: NoAugHead(head, extractor, requests)
            return data

    class NoiseDraws(FeatureCache):
        """``draws`` cached noise draws of every train image, no augmentation."""

        def prepare(self, cfg, requests, splits=SPLITS):
            out = {}
            for split in splits:
                if split == "train":
                    out[split] = ViewCycle([self.get(dataclasses.replace(
                        cfg, noise_seed=draw_seed(cfg.noise_seed, k, draws)), split, requests)
                        for k in range(draws)])
                else:
                    out[split] = self.get(cfg, split, requests)
            first = out[splits[0]]
            return TrialData(out, first.shapes(), len(first.classes))

    return {"paper": OnlineFeatures, "fresh": FreshNoise,
            "cached1": lambda: FeatureCache(cache_root),
            f"draws{draws}": lambda: NoiseDraws(cache_root),
            f"views{draws}": lambda: FeatureCache(cache_root)}


def score(cfg, source, cache_root: str) -> float:
    """Train ``cfg`` on ``source`` and evaluate it once on the cached test features."""
    import torch

    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.pipeline import evaluate_on, run_trial

    torch.manual_seed(cfg.seed)  # the online ways draw their noise from the global generator
    head, _ = run_trial(cfg, source=source)
    return evaluate_on(head, cfg, "test", source=FeatureCache(cache_root))["test_top1"]


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="the first N configs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--views", type=int, default=4, help="K of the drawsK and viewsK ways")
    args = ap.parse_args()
    configure()
    import torch

    from difftune.trainables.config import TrialConfig

    torch.set_num_threads(os.cpu_count() or 1)
    configs = CONFIGS[:args.configs]
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_root:
        arms = sources(cache_root, args.views)
        scores = {a: np.zeros((len(configs), args.seeds)) for a in arms}
        for c, (head, block) in enumerate(configs):
            for seed in range(args.seeds):
                for arm, make in arms.items():
                    views = args.views if arm.startswith("views") else 1
                    cfg = TrialConfig(**{**RECIPE, **head, "epochs": args.epochs,
                                         "block": block, "seed": seed, "noise_seed": seed,
                                         "views": views})
                    scores[arm][c, seed] = score(cfg, make(), cache_root)
                print(f"{head['head']:>6} block {block:>2} seed {seed}: " + "  ".join(
                    f"{a} {scores[a][c, seed]:.2f}" for a in arms), flush=True)
    summary: dict[str, object] = {"configs": len(configs), "seeds": args.seeds,
                                  "epochs": args.epochs, "views": args.views}
    for arm, cells in scores.items():
        mean, lo, hi = config_ci(cells)
        summary.update({f"{arm}_top1": mean, f"{arm}_lo": lo, f"{arm}_hi": hi})
    draws, views = f"draws{args.views}", f"views{args.views}"
    contrasts = {f"{a}_minus_paper": (a, "paper") for a in arms if a != "paper"}
    contrasts.update({"aug_online": ("paper", "fresh"), "frozen_noise": ("cached1", "fresh"),
                      "k_draws": (draws, "cached1"), "aug_cached": (views, draws)})
    for name, (a, b) in contrasts.items():
        mean, lo, hi = config_ci(scores[a] - scores[b])
        summary.update({name: mean, f"{name}_lo": lo, f"{name}_hi": hi})
    summary.update({"wall_s": time.perf_counter() - start, "load_1min_start": load_start,
                    "split": "test", "ci": "bootstrap_over_configs"})
    record("cache_fidelity", **summary)


if __name__ == "__main__":
    main()
