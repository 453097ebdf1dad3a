"""The probe rung (``search: {probe_rung: true}``): before the first trial, every (block, t)
the space can ask is scored on the first rung's sample of the images by a closed-form ridge
probe (:mod:`difftune.trainables.train.ridge`), giving a complete block x timestep map and a
prior the first trials draw from.

- **Cells**: the space's block set (:meth:`~difftune.search.space.spec.Space.block_set`) x
  every timestep a trial can ask (:func:`~difftune.search.plan.arithmetic.levers_of`), each
  at the space's pool (``cache_pool``, else the largest pool a trial can ask; capped at the
  block's map).
- **Sample**: the first ``rung_rows(targets, image_rungs[0], image_floor)`` images of train
  and of val in their interleaved order, read through the feature cache's prefix entries
  (``FeatureCache.get_prefix``, view 0), so that the trials' rung 0 later hits them: no image
  passes the U-Net twice for one (t, view). A probe rung without ``image_rungs`` samples
  :data:`DEFAULT_FRACTION` of each split (its entries then serve no trial: trials without
  rungs read whole-split entries).
- **Probe**: per cell, a :class:`~difftune.trainables.train.ridge.StreamingRidge` fed
  :data:`CHUNK` rows at a time of the memory-mapped entries (bounded memory), fitted on the
  train sample, its strength picked and scored on the val sample (val top-1, %).
- **Where**: one Ray task with a linear trial's resources (a GPU when trials get GPUs),
  progress lines on the driver's console; :func:`probe_map` is the same work in this process.
- **Records**: ``probe_map.json`` and ``figures/probe_map.png`` on the parent run, its U-Net
  passes as the metric ``probe_unet_images``, the best cells in the tag ``difftune.probe``
  (the description's lines, :mod:`difftune.search.report.probe_figure`). ``--resume`` finds
  the map there and does not probe again.
- **Prior**: the top :func:`~difftune.search.space.distributions.startup_trials` cells become
  Optuna's first points (:func:`prior_points`, ``build_tuner(points=...)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from difftune.search.plan.arithmetic import levers_of
from difftune.search.report.probe_figure import (
    MAP_ARTIFACT,
    METRIC,
    TAG,
    best_cells,
    draw_probe_map,
    read_probe_map,
    summary_tag,
)
from difftune.search.run.cluster import cluster_gpus, trial_resources
from difftune.search.run.extract import WorkerPool, cluster_workers, extract_prefixes
from difftune.search.space import distributions
from difftune.search.space.spec import Space
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import targets_of
from difftune.trainables.data.order import DEFAULT_FLOOR, rung_rows
from difftune.trainables.model.cost import model_costs
from difftune.trainables.model.features import block_sizes
from difftune.trainables.model.unet import model_geometry
from difftune.trainables.params import decode
from difftune.trainables.pipeline import trial_dataset
from difftune.trainables.train.ridge import LAMBDAS, PROJECT_TO, StreamingRidge, score_solution
from difftune.trainables.trainable import RuntimeOptions, make_source

logger = logging.getLogger(__name__)

#: the sample of each split a probe rung reads when the space has no ``image_rungs``
DEFAULT_FRACTION = 0.1
#: rows of an entry read at once
CHUNK = 512
#: the settings a point of the prior takes from the cell
CELL_KEYS = ("block", "t")


# ------------------------------------------------------------------------------ what it asks


def probe_pool(space: Space) -> int:
    """The pool the probe reads: the space's ``cache_pool``, else the largest ``pool`` or
    ``pre_pool`` a trial can ask, else 1."""
    if space.search.get("cache_pool"):
        return int(space.search["cache_pool"])
    pools = [int(v) for h in space.head_types() for k in ("pool", "pre_pool")
             for v in space.values(h).get(k, []) if isinstance(v, int)]
    return max(pools, default=1)


def probe_cells(space: Space) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(blocks, timesteps, pool)``: the cells of the map (every block x every t)."""
    return tuple(space.block_set()), tuple(levers_of(space).timesteps), probe_pool(space)


def probe_fraction(space: Space) -> float:
    """The first rung's fraction (:data:`DEFAULT_FRACTION` without ``image_rungs``)."""
    rungs = space.search.get("image_rungs")
    return float(rungs[0]) if rungs else DEFAULT_FRACTION


def probe_config(space: Space) -> TrialConfig:
    """The settings of the space's trials that key their cache entries (model, data, its
    data settings, ``seed``, ``noise_seed``): the probe's entries are theirs."""
    if {"seed", "noise_seed"} & set(space.params):
        logger.warning("probe rung: the space searches seed or noise_seed; the probe reads "
                       "the entries of seed 0, noise_seed 0, which only such trials hit")
    keys = ("seed", "noise_seed", "label_fraction", "holdout", "bad_images")
    return TrialConfig.from_dict({
        "model": space.model, "checkpoint": space.checkpoint, "data": space.data,
        **{k: space.setting(k) for k in keys if k not in space.params}})


# -------------------------------------------------------------------------------- the work


def _rows(features, key: tuple[int, int], at: slice) -> torch.Tensor:
    """[n x C x p x p] float32 rows ``at`` of one entry of ``features`` (pooled from the
    stored P to the p it serves)."""
    m = features.maps()[key]
    x = torch.from_numpy(m.take(np.arange(at.start, at.stop))).float()
    p, big = features.entries[key][1], x.shape[-1]
    if p != big:  # exact: p divides P
        f = big // p
        x = x.view(*x.shape[:2], p, f, p, f).mean(dim=(3, 5))
    return x


def _batches(features, key: tuple[int, int], chunk: int):
    n = len(features)
    for a in range(0, n, chunk):
        at = slice(a, min(n, a + chunk))
        yield _rows(features, key, at), features.labels[at]


def sample_rows(cfg: TrialConfig, image_size: int, fraction: float, floor: int
                ) -> dict[str, int]:
    """``{"train": n, "val": m}``: the rows of the probe's sample of each split."""
    return {s: rung_rows(targets_of(trial_dataset(cfg, s, image_size)[0]), fraction, floor)
            for s in ("train", "val")}


def probe_map(cfg: TrialConfig, *, blocks: tuple[int, ...], timesteps: tuple[int, ...],
              pool: int, fraction: float, floor: int = DEFAULT_FLOOR,
              runtime: RuntimeOptions, device: str = "cpu",
              say: Callable[[str], None] | None = None, every_s: float = 10.0,
              chunk: int = CHUNK, project_to: int = PROJECT_TO) -> dict[str, Any]:
    """The probe rung's map, computed in this process (the Ray task runs it).

    :param runtime: the trials' runtime options (their cache, its policy and keys).
    :param say: takes progress lines (cells done, time left) and the cache's extraction lines.
    :return: the map (``probe_map.json``): ``cells`` [{block, t, pool, val_top1, val_mse,
        lambda, dim, probe_dim}], ``fraction``, ``floor``, ``train_rows``, ``val_rows``,
        ``classes``, ``unet_images``, ``seconds``.
    """
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="difftune-probe-") as scratch:
        run = runtime if runtime.cache and not runtime.online else RuntimeOptions(
            cache=scratch, store_pool=pool, extra_blocks=tuple(blocks))
        cache = make_source(run, device, on_progress=say)
        model = cache.resolve(cfg, "train", [(timesteps[0], blocks[0], 1)])[0]
        rows = sample_rows(cfg, model.image_size, fraction, floor)
        native = block_sizes(model)
        pools = {b: min(pool, native[b]) for b in blocks}
        cells, total, last = [], len(blocks) * len(timesteps), time.monotonic()
        for t in timesteps:
            requests = [(t, b, pools[b]) for b in blocks]
            feats = {s: cache.get_prefix(cfg, s, requests, rows[s]) for s in ("train", "val")}
            classes = len(feats["train"].classes)
            for b in blocks:
                key = (t, b)
                dim = int(np.prod(feats["train"].shapes()[key]))
                ridge = StreamingRidge(dim, classes, project_to=project_to, device=device)
                for x, y in _batches(feats["train"], key, chunk):
                    ridge.update(x, y)
                out = score_solution(ridge, _batches(feats["val"], key, chunk), LAMBDAS)
                cells.append({"block": b, "t": t, "pool": pools[b], **{
                    k: out[k] for k in ("val_top1", "val_mse", "lambda", "dim", "probe_dim")}})
                if say is not None and time.monotonic() - last >= every_s:
                    last = time.monotonic()
                    took = last - began
                    left = took / len(cells) * (total - len(cells))
                    say(f"probe rung: {len(cells)}/{total} cells (t={t}), {took:.0f} s, "
                        f"~{left:.0f} s left")
            del feats
        unet_images = int(cache.unet_images)
    out = {"cells": cells, "fraction": fraction, "floor": floor, "train_rows": rows["train"],
           "val_rows": rows["val"], "classes": classes, "unet_images": unet_images,
           "seconds": round(time.monotonic() - began, 3), "lambdas": list(LAMBDAS),
           "project_to": project_to, "blocks": list(blocks), "timesteps": list(timesteps),
           "pool": pool}
    if say is not None:
        best = best_cells(out, 1)[0]
        say(f"probe rung: {total} cells in {out['seconds']:.0f} s ({unet_images:,} U-Net "
            f"image-passes); best block {best['block']} t={best['t']}: "
            f"{best['val_top1']:.1f}% val top-1")
    return out


class _Board:
    """Lines from the probe's task, drained by the driver (a Ray actor)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _task(cfg: dict[str, Any], kw: dict[str, Any], runtime: dict[str, Any], board: Any
          ) -> dict[str, Any]:
    import ray  # Ray: only where the probe runs as its task

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    return probe_map(TrialConfig.from_dict(cfg), runtime=RuntimeOptions.from_dict(runtime),
                     device=device, say=lambda line: ray.get(board.post.remote(line)), **kw)


def _resources(space: Space) -> dict[str, float]:
    """A linear trial's resources (the probe reads what a linear head reads)."""
    res = trial_resources(space.search, gpus_available=cluster_gpus())
    res = res({"head": "linear"}) if callable(res) else res
    return {"num_cpus": float(res.get("cpu", 1.0)), "num_gpus": float(res.get("gpu", 0.0))}


def extend_on_pool(space: Space, runtime: RuntimeOptions, pool: WorkerPool) -> int:
    """Extend the probe's prefix entries (every t x the block set, rung 0's sample of train
    and val) across ``pool``'s workers first (:func:`~.extract.extract_prefixes`), so that
    the probe's task only reads. :return: the U-Net image-passes it took."""
    blocks, timesteps, size = probe_cells(space)
    cfg = probe_config(space)
    sides = {b: c.side for b, c in model_costs(space.model, space.checkpoint).items()}
    image_size = model_geometry(space.model, space.checkpoint).image_size
    rows = sample_rows(cfg, image_size, probe_fraction(space),
                       int(space.search.get("image_floor") or DEFAULT_FLOOR))
    requests = [(t, b, min(size, sides[b])) for t in timesteps for b in blocks]
    counts = extract_prefixes(
        cfg, requests, rows, cache=runtime.cache, pool=pool, store_pool=runtime.store_pool,
        extra_blocks=runtime.extra_blocks, budget=runtime.cache_budget,
        data_files=dict(runtime.data_files), data_hash=runtime.data_hash,
        batch_size=runtime.extract_batch)
    logger.info("probe rung: its entries extended on %s (%d image-passes, %.1f s)",
                pool.workers.describe(), counts["images"], counts["wall_s"])
    return int(counts["images"])


def run_probe(space: Space, runtime: RuntimeOptions, *, local: bool = False) -> dict[str, Any]:
    """Compute the probe rung's map as one Ray task (or in this process with ``local``),
    its progress lines logged here. On a cluster of several workers, the U-Net passes are
    spread over them first (:func:`extend_on_pool`, one pool, one U-Net load per worker)."""
    blocks, timesteps, pool = probe_cells(space)
    kw = {"blocks": blocks, "timesteps": timesteps, "pool": pool,
          "fraction": probe_fraction(space),
          "floor": int(space.search.get("image_floor") or DEFAULT_FLOOR),
          "every_s": float(runtime.progress_s)}
    logger.info("probe rung: %d blocks x %d timesteps at pool %d on %.3g of train and val",
                len(blocks), len(timesteps), pool, kw["fraction"])
    if local:
        return probe_map(probe_config(space), runtime=runtime, say=logger.info, **kw)
    import ray  # Ray: only for the task

    passes = 0
    workers = cluster_workers(gpus=bool(_resources(space)["num_gpus"]))
    if runtime.cache and not runtime.online and workers.shards > 1:
        with WorkerPool(workers, progress=False, lines_s=runtime.progress_s) as pool:
            passes = extend_on_pool(space, runtime, pool)
    board = ray.remote(num_cpus=0)(_Board).remote()
    ref = ray.remote(_task).options(**_resources(space), max_retries=1).remote(
        probe_config(space).to_dict(), kw, runtime.to_dict(), board)
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            for line in ray.get(board.drain.remote()):
                logger.info("%s", line)
            if ready:
                pmap = ray.get(ref)
                pmap["unet_images"] = int(pmap["unet_images"]) + passes
                return pmap
    except BaseException:  # Ctrl-C, or the task failed: nothing of it left running
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)


# ------------------------------------------------------------------------------ the prior


def prior_points(space: Space, pmap: dict[str, Any], *, n: int | None = None,
                 seed: int | None = None) -> list[dict[str, Any]]:
    """Optuna points (flat parameter names) for the map's top cells
    (:func:`~difftune.search.report.probe_figure.best_cells`), ``n`` of them (default
    :func:`~difftune.search.space.distributions.startup_trials`): each a head that reads
    ``block`` and ``t`` (the paper's config's when it is one, else a seeded pick) at the
    cell's block and t, its other settings the paper's config's where it gives them (and
    they lie in the space), else a seeded draw from the space. A cell no such trial can
    ask is passed over."""
    import optuna  # Optuna: only when points are made

    n = distributions.startup_trials(int(space.search["trials"])) if n is None else n
    seed = int(space.search["seed"]) if seed is None else seed
    heads = [h for h in space.head_types()
             if all(distributions.reads(h, k) for k in CELL_KEYS)]
    if n <= 0 or not heads or not set(CELL_KEYS) & set(space.params):
        return []
    paper = dict(space.paper_config or {})
    rng = random.Random(seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    searched_head = len(space.head_types()) > 1
    points: list[dict[str, Any]] = []
    for cell in best_cells(pmap, None):
        if len(points) >= n:
            break
        head = paper.get("head") if paper.get("head") in heads else rng.choice(heads)
        if searched_head:
            study.enqueue_trial({"head": head})
        trial = study.ask()
        space.define_by_run(trial)  # a seeded draw of everything else
        config = {"head": head, **decode(trial.params),
                  **{k: cell[k] for k in CELL_KEYS}}
        drawn = space.point(config)
        if drawn is None:  # the cell is outside what a trial of this head can ask
            continue
        if paper.get("head", head) == head:
            ours = space.point({**config, **{k: v for k, v in paper.items()
                                             if k not in CELL_KEYS}})
            drawn = ours if ours is not None else drawn
        points.append(drawn)
    return points


# ----------------------------------------------------------------------- a search's probe


def record_probe(client: Any, parent: str, pmap: dict[str, Any]) -> None:
    """Put the map on the parent run: ``probe_map.json``, ``figures/probe_map.png``, the
    metric ``probe_unet_images`` and the tag ``difftune.probe`` (its summary)."""
    import matplotlib.pyplot as plt  # matplotlib: only when the figure is drawn

    client.log_dict(parent, pmap, MAP_ARTIFACT)
    client.log_metric(parent, METRIC, float(pmap["unet_images"]))
    client.set_tag(parent, TAG, json.dumps(summary_tag(pmap)))
    try:
        fig = draw_probe_map(pmap)
    except Exception:  # a figure is never worth failing the search
        logger.warning("the probe map's figure could not be drawn", exc_info=True)
        return
    try:
        client.log_figure(parent, fig, "figures/probe_map.png", save_kwargs={"dpi": 120})
    finally:
        plt.close(fig)


def probe_rung(space: Space, runtime: RuntimeOptions, *, client: Any, parent: str,
               local: bool = False) -> dict[str, Any] | None:
    """A search's probe rung: None unless ``search.probe_rung``; the map already on the
    parent run (``--resume``), or a new one, computed and recorded."""
    if not space.search.get("probe_rung"):
        return None
    pmap = read_probe_map(client, parent)
    if pmap is not None:
        logger.info("probe rung: the map is on the parent run already; not probing again")
        return pmap
    pmap = run_probe(space, runtime, local=local)
    record_probe(client, parent, pmap)
    return pmap


def first_points(space: Space, runtime: RuntimeOptions, *, client: Any, parent: str
                 ) -> list[dict[str, Any]] | None:
    """What a new search runs first from its probe rung (:func:`probe_rung`, then
    :func:`prior_points`); None without ``search.probe_rung``. A probe that fails is logged
    and the search goes on without its map (its trials meet the same failure if it is
    theirs too)."""
    if not space.search.get("probe_rung"):
        return None
    try:
        pmap = probe_rung(space, runtime, client=client, parent=parent)
    except Exception as exc:  # noqa: BLE001 - the map is a prior, not the search
        logger.warning("probe rung failed (%s); the search goes on without its map",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                       exc_info=True)
        return None
    points = prior_points(space, pmap)
    logger.info("probe rung: %d startup points from the map: %s", len(points),
                ", ".join(f"block {p.get('block')} t={p.get('t')}" for p in points) or "-")
    return points


__all__ = ["DEFAULT_FRACTION", "first_points", "prior_points", "probe_cells", "probe_config", "probe_map",
           "probe_rung", "record_probe", "run_probe"]
