"""The per-rung score table behind :mod:`benchmarks.data_fidelity`: every config of the demo
space's linear heads (block x t x pool, 4 epochs, :mod:`benchmarks.optuna_vs_random`'s
recipe) trained and scored at every rung over images, through the real pipeline (an epoch
reads a rung's train sample :meth:`~difftune.trainables.data.order.Rung.passes` times, as a
search's trial does).

A rung's sample of a split is the first :func:`~difftune.trainables.data.order.rung_rows`
images of the split's interleaved order, read with ``FeatureCache.get_prefix`` (float32
entries, one cache root per pool, every block of the grid extracted in one pass per timestep:
the entries extend by the new images only, and the U-Net image-passes the cache counts are
checked against the replay's pricing). The head trains on the rung's sample of train, its rows
put back in split order (so the last rung trains on exactly what a whole-split trial trains
on: ``train_head`` shuffles by a seeded permutation of the rows), and is scored on the rung's
sample of val; at the last rung also on the whole test split. Also measured: the U-Net's
seconds per image and the head's seconds per config at each rung (what the replay's modelled
compute time is made of).

The harder task (``--task noisy``, ``benchmarks/demo_rungs_noisy.json``): the same digits in
the same splits, each with seeded Gaussian pixel noise and a blanked square
(:func:`benchmarks.data_fidelity_tasks.noisy_digits`), read as an ImageFolder tree. The
larger task (``--task augmented``, ``benchmarks/demo_rungs_augmented.json``): 8 seeded
rotated, shifted, noisy copies of every digit
(:func:`~benchmarks.data_fidelity_tasks.augmented_digits`), so that rung 0's 2 % clears the
floor of 5 images per class.

``python -m benchmarks.data_fidelity --rebuild [--task noisy]`` rebuilds a table (about 30
minutes on one core: 51 timesteps; ``--task augmented``: about 80 minutes with ``--jobs 2``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difftune.trainables.data.order import DEFAULT_STEPS

logger = logging.getLogger("data_fidelity")

SPLITS = ("train", "val")
HERE = Path(__file__).resolve().parent
FRACTIONS = (0.02, 0.1, 0.5, 1.0)
FLOOR = 5
EPOCHS, LR = 4, 0.05  # the demo grid's recipe (benchmarks/optuna_vs_random.py)
#: task -> (its table, the parameters its images are made with, by
#: :data:`benchmarks.data_fidelity_tasks.MAKERS`: None for the digits themselves)
TASKS: dict[str, tuple[Path, dict | None]] = {
    "digits": (HERE / "demo_rungs.json", None),
    "noisy": (HERE / "demo_rungs_noisy.json", {"sigma": 0.4, "patch": 6, "seed": 0}),
    "augmented": (HERE / "demo_rungs_augmented.json",
                  {"copies": 8, "degrees": 20, "shift": 2, "sigma": 0.3, "seed": 0}),
}
Key = tuple[int, int, int]


@dataclass
class Table:
    """The per-rung scores: ``scores[key]`` = val top-1 at each rung; ``test[key]`` at the
    last; ``rows[split][k]`` = a rung's images; the measured seconds; the probe's map."""

    scores: dict[Key, list[float]]
    test: dict[Key, float]
    rows: dict[str, list[int]]
    unet_s: float
    train_s: list[float]
    probe: dict[tuple[int, int], float] = field(default_factory=dict)
    probe_s: float = 0.0
    unet_images: dict[int, int] = field(default_factory=dict)

    @property
    def rungs(self) -> int:
        return len(self.rows["train"])

    def grid(self) -> dict[Key, dict[str, float]]:
        """The full rung as a grid (what the searches without rungs replay)."""
        return {k: {"val": v[-1], "test": self.test[k]} for k, v in self.scores.items()}

    def images(self, k: int) -> int:
        """Train + val images of rung ``k``."""
        return self.rows["train"][k] + self.rows["val"][k]

    def only(self, keys: Sequence[Key]) -> Table:
        """The table over those of ``keys`` it holds (the probe's map at their timesteps)."""
        wanted = set(keys)
        keep = [k for k in self.scores if k in wanted]
        ts, every = {t for _, t, _ in keep}, {t for _, t, _ in self.scores}
        return dataclasses.replace(
            self, probe_s=self.probe_s * len(ts) / max(1, len(every)),
            scores={k: self.scores[k] for k in keep}, test={k: self.test[k] for k in keep},
            probe={c: v for c, v in self.probe.items() if c[1] in ts},
            unet_images={t: n for t, n in self.unet_images.items() if t in ts})


def read_table(path: Path) -> Table:
    raw = json.loads(path.read_text())
    keys = [(c["block"], c["t"], c["pool"]) for c in raw["configs"]]
    return Table(scores={k: c["rungs"] for k, c in zip(keys, raw["configs"], strict=True)},
                 test={k: c["test"] for k, c in zip(keys, raw["configs"], strict=True)},
                 rows=raw["rows"], unet_s=raw["unet_s_per_image"], train_s=raw["train_s"],
                 probe={(p["block"], p["t"]): p["val"] for p in raw.get("probe", [])},
                 probe_s=raw.get("probe_s", 0.0),
                 unet_images={int(t): n for t, n in raw.get("unet_images", {}).items()})


def make_table(path: Path, keys: Sequence[Key], task: str = "digits",
               min_steps: int = DEFAULT_STEPS, jobs: int = 1) -> Table:
    """Build the table of ``keys`` on ``task`` (the grid's recipe; an early rung's epoch
    takes ``min_steps`` SGD steps where its sample allows, as ``search.rung_steps``) into
    ``path``, its timesteps dealt to ``jobs`` processes of one thread each."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from benchmarks.data_fidelity_tasks import task_images

    noise = TASKS[task][1]
    with tempfile.TemporaryDirectory() as d:
        data = "digits" if noise is None else str(task_images(Path(d) / task, task, noise))
        kw = dict(fractions=FRACTIONS, floor=FLOOR, epochs=EPOCHS, lr=LR, data=data,
                  min_steps=min_steps)
        ts = sorted({t for _, t, _ in keys})
        parts = [[k for k in keys if k[1] in ts[j::jobs]] for j in range(jobs)]
        parts = [p for p in parts if p]
        if len(parts) == 1:
            table = build(keys, **kw)
        else:
            with ProcessPoolExecutor(len(parts), mp_context=get_context("spawn")) as pool:
                table = merge(list(pool.map(_build_part, [(p, kw) for p in parts])), keys)
    save(path, table, model="demo", task=task, data="digits", **(noise or {}),
         recipe=f"linear probe, {EPOCHS} epochs, lr {LR}, momentum 0.9, from scratch per rung")
    return read_table(path)


def _build_part(args: tuple[Sequence[Key], dict]) -> dict:
    """:func:`build` of one process's keys (a picklable call for the process pool)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    keys, kw = args
    return build(keys, **kw)


def merge(parts: Sequence[dict], keys: Sequence[Key]) -> dict:
    """One table from :func:`build`'s tables of disjoint timesteps (configs in ``keys``'
    order; the measured seconds averaged over the parts, weighted by their configs)."""
    n = [len(p["configs"]) for p in parts]
    w = [k / sum(n) for k in n]
    by = {(c["block"], c["t"], c["pool"]): c for p in parts for c in p["configs"]}
    return {**parts[0], "configs": [by[k] for k in keys], "probe_s": sum(p["probe_s"] for p in parts),
           "unet_s_per_image": sum(x * p["unet_s_per_image"] for x, p in zip(w, parts, strict=True)),
           "train_s": [sum(x * p["train_s"][r] for x, p in zip(w, parts, strict=True))
                       for r in range(len(parts[0]["train_s"]))],
           "unet_images": {t: v for p in parts for t, v in p["unet_images"].items()},
           "probe": sorted((q for p in parts for q in p["probe"]),
                           key=lambda q: (q["block"], q["t"]))}


def spearman(table: Table) -> list[float]:
    """Spearman's rho between each rung's val and the last rung's, over the configs."""
    from scipy.stats import spearmanr

    keys = sorted(table.scores)
    full = [table.scores[k][-1] for k in keys]
    return [float(spearmanr([table.scores[k][r] for k in keys], full).statistic)
            for r in range(table.rungs)]


def _read(cache, cfg, split: str, requests, rows: int) -> tuple[dict, np.ndarray]:
    """``({(t, block): [rows x C x p x p]}, [rows] labels)`` of the first ``rows`` images of
    ``split`` in its interleaved order, through the cache."""
    got = cache.get_prefix(cfg, split, requests, rows)
    return got._read(np.arange(rows)), np.asarray(got.labels[:rows], dtype=np.int64)


def build(keys: Sequence[tuple[int, int, int]], *, fractions: Sequence[float], floor: int,
          epochs: int, lr: float, data: str = "digits", label_fraction: float | None = None,
          root: str | None = None, min_steps: int = DEFAULT_STEPS) -> dict:
    """Val top-1 of every ``(block, t, pool)`` of ``keys`` at every rung, test top-1 at the
    last, and what the rungs cost.

    :return: ``{"rows": {split: [rows per rung]}, "configs": [{block, t, pool, rungs: [val
        top-1 per rung], test}], "unet_s_per_image", "train_s": [mean s per config per rung],
        "unet_images": {t: passes the cache counted}, "probe": [{block, t, val}]}``: the
        probe rung's ridge probe (:mod:`difftune.trainables.train.ridge`) of every (block,
        t) on the first rung's samples at the widest pool.
    """
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.data.datasets import load_dataset, targets_of
    from difftune.trainables.data.order import interleaved_order, ladder, repeat_for, rung_rows
    from difftune.trainables.heads import build_head
    from difftune.trainables.model.unet import load_unet
    from difftune.trainables.train.loop import FeatureTensors, train_head
    from difftune.trainables.train.probe import probe_config
    from difftune.trainables.train.ridge import probe_scores

    torch.set_num_threads(1)
    blocks = sorted({b for b, _, _ in keys})
    pools = sorted({p for _, _, p in keys})
    timesteps = sorted({t for _, t, _ in keys})
    size = load_unet("demo")[0].image_size
    loaded = {s: load_dataset(data, split=s, image_size=size, label_fraction=label_fraction)
              for s in SPLITS}
    targets = {s: targets_of(ds) for s, (ds, _) in loaded.items()}
    classes = len(loaded["train"][1])
    rows = {s: [rung_rows(targets[s], f, floor) for f in fractions] for s in SPLITS}
    # the rows of a train sample, back in split order (positions in the prefix)
    order = interleaved_order(targets["train"])
    back = [np.argsort(order[:n], kind="stable") for n in rows["train"]]
    rungs = ladder(fractions, floor=floor, min_steps=min_steps)  # rung.passes() per epoch
    scores: dict[tuple[int, int, int], list[float]] = {k: [] for k in keys}
    test: dict[tuple[int, int, int], float] = {}
    train_s = [0.0] * len(fractions)
    passes: dict[int, int] = {}
    probe: dict[tuple[int, int], float] = {}
    probe_s = 0.0
    with tempfile.TemporaryDirectory(dir=root) as d:
        caches = {p: FeatureCache(f"{d}/p{p}", store_pool=p, extra_blocks=blocks,
                                  dtype="float32", batch_size=256) for p in pools}
        for t in timesteps:
            before = {p: c.stats.forward_images for p, c in caches.items()}
            for k in range(len(fractions)):
                feats: dict[tuple[str, int], tuple[dict, np.ndarray]] = {}
                for p, cache in caches.items():
                    cfg = probe_config(block=blocks[0], t=t, pool=p, epochs=epochs, lr=lr,
                                       data=data, label_fraction=label_fraction)
                    for s in SPLITS:
                        feats[s, p] = _read(cache, cfg, s, [(t, b, p) for b in blocks],
                                            rows[s][k])
                if k == len(fractions) - 1:  # train + val only: the test pass is not priced
                    counted = {c.stats.forward_images - before[p] for p, c in caches.items()}
                    if len(counted) != 1:
                        raise RuntimeError(f"t={t}: the pool roots passed {counted} images")
                    passes[t] = counted.pop()
                if k == 0:  # the probe rung: a ridge probe of every block at the widest pool
                    (x, y), (xv, yv) = feats["train", pools[-1]], feats["val", pools[-1]]
                    start = time.perf_counter()
                    for b in blocks:
                        probe[b, t] = probe_scores(x[(t, b)], y, xv[(t, b)], yv,
                                                   classes=classes)["val_top1"]
                    probe_s += time.perf_counter() - start
                for (b, tt, p) in keys:
                    if tt != t:
                        continue
                    cfg = probe_config(block=b, t=t, pool=p, epochs=epochs, lr=lr, data=data,
                                       label_fraction=label_fraction)
                    x, y = feats["train", p]
                    i = torch.from_numpy(back[k])
                    train = repeat_for(FeatureTensors({(t, b): x[(t, b)][i]},
                                                      torch.from_numpy(y)[i]), rungs[k], 64)
                    x, y = feats["val", p]
                    val = FeatureTensors({(t, b): x[(t, b)]}, torch.from_numpy(y))
                    start = time.perf_counter()
                    head = build_head(cfg, train.shapes(), classes)
                    scores[b, t, p].append(train_head(head, train, val, cfg)[-1]["val_top1"])
                    train_s[k] += time.perf_counter() - start
                    if k == len(fractions) - 1:
                        test[b, t, p] = _test(caches[p], cfg, head, t, b, p)
            logger.warning("t=%d done (%d U-Net images per pool root)", t, passes[t])
        stats = [c.stats for c in caches.values()]  # (the test passes are timed too)
    per_t = len(keys) // len(timesteps)
    return {
        "rows": rows, "fractions": list(fractions), "floor": floor,
        "rung_passes": [r.passes(n, 64) for r, n in zip(rungs, rows["train"], strict=True)],
        "unet_s_per_image": sum(s.forward_seconds for s in stats)
        / max(1, sum(s.timed_images for s in stats)),
        "train_s": [s / (per_t * len(timesteps)) for s in train_s],
        "unet_images": {str(t): n for t, n in passes.items()},
        "probe_pool": pools[-1], "probe_s": probe_s,
        "probe": [{"block": b, "t": t, "val": v} for (b, t), v in sorted(probe.items())],
        "configs": [{"block": b, "t": t, "pool": p, "rungs": scores[b, t, p],
                     "test": test[b, t, p]} for (b, t, p) in keys]}


def _test(cache, cfg, head, t: int, b: int, p: int) -> float:
    """Test top-1 of ``head`` on the whole test split (a whole-split entry)."""
    from difftune.trainables.train.loop import evaluate

    return evaluate(head, cache.get(cfg, "test", [(t, b, p)]))["val_top1"]


def save(path: Path, table: dict, **about: object) -> None:
    """Write ``table`` (and what it was built from) as JSON, one config per line."""
    configs = table["configs"]
    head = {**about, **{k: v for k, v in table.items() if k != "configs"}}
    lines = [json.dumps(c) for c in configs]
    path.write_text(json.dumps(head, indent=1)[:-2] + ',\n "configs": [\n'
                    + ",\n".join(lines) + "\n]}\n")


def probe_spearman(table: Table) -> float:
    """Spearman's rho between the probe rung's map (ridge at rung 0, widest pool) and each
    (block, t) cell's best full val over its pools (nan without a probe)."""
    from scipy.stats import spearmanr

    if not table.probe:
        return float("nan")
    best: dict[tuple[int, int], float] = {}
    for (b, t, _), v in table.scores.items():
        best[b, t] = max(best.get((b, t), -1.0), v[-1])
    cells = sorted(table.probe)
    return float(spearmanr([table.probe[c] for c in cells], [best[c] for c in cells]).statistic)


#: the demo space's timesteps (``spaces/demo.yaml``: t from 0 to 500, step 10); the table
#: holds every one (optuna_vs_random's grid holds 8 of them)
TIMESTEPS = list(range(0, 501, 10))


def table_keys() -> list[Key]:
    """The table's configs: blocks 1-19 x :data:`TIMESTEPS` x pool {1, 2, 4} (2,907)."""
    from benchmarks.optuna_vs_random import BLOCKS, POOLS

    return [(b, t, p) for b in BLOCKS for t in TIMESTEPS for p in POOLS]


def oracle_ranks(table: Table) -> list[int]:
    """At each rung, the rank (1: the best val there; ties share the better rank) of the
    val-oracle's config (the best of its ties): how early a rung could single it out."""
    keys = sorted(table.scores)
    top = max(table.scores[k][-1] for k in keys)
    best = [k for k in keys if table.scores[k][-1] == top]
    return [min(1 + sum(table.scores[o][r] > table.scores[k][r] for o in keys) for k in best)
            for r in range(table.rungs)]


def median_ratio(num: Sequence[float], den: Sequence[float], *, reps: int = 10000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``median(num) / median(den)`` and its 95 % paired bootstrap interval over seeds
    (medians without interpolation: a search that never answered counts as ``inf``)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(reps, len(a)))
    med = lambda x: np.quantile(x, 0.5, axis=-1, method="inverted_cdf")  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore"):
        r = med(a[idx]) / med(b[idx])
        point = float(med(a) / med(b))
    r = r[~np.isnan(r)]
    return point, float(np.quantile(r, 0.025, method="inverted_cdf")), \
        float(np.quantile(r, 0.975, method="inverted_cdf"))


def tiny_keys() -> list[Key]:
    """The ``--tiny`` grid: blocks 1-2 x t {0, 30} x pool {1, 2} (the U-Net stops early)."""
    return [(b, t, p) for b in (1, 2) for t in (0, 30) for p in (1, 2)]
