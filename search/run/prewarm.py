"""Filling the feature cache ahead of the trials: the runtime options of a plan's cache policy
(:func:`cache_options`), a search's extraction before its first trial when the cluster has
more than one worker (:func:`extract_first`), and ``difftune extract --space``
(:func:`extract_space`), and ``difftune extract`` of given timesteps and blocks
(:func:`extract_entries`). The extraction itself, sharded over the cluster, is
:mod:`.extract`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from difftune.search.plan.estimate import Plan, data_size, make_plan, refuse_if_over, resolve_budget
from difftune.search.run.cluster import ensure_ray
from difftune.search.run.extract import cluster_workers, extract_plan, why_not
from difftune.search.space.spec import Space, load_space
from difftune.trainables.cache.feature_cache import FeatureCache, default_root
from difftune.trainables.cache.policy import usage
from difftune.trainables.cache.store import Store
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import split_files_fingerprints
from difftune.trainables.errors import UserError
from difftune.trainables.model.features import check_blocks, check_pool, check_timestep
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.pipeline import clamp_requests
from difftune.trainables.trainable import RuntimeOptions

logger = logging.getLogger(__name__)

#: where a line for the user goes (the command line prints it; by default: the log)
Echo = Callable[[str], None]


def _log(line: str) -> None:
    logger.info("%s", line)


def cache_options(plan: Plan, cache: str | None, explicit: bool, data_hash: str, data: str
                  ) -> dict[str, Any]:
    """The runtime options of the plan's cache policy: what a miss stores, the budget the
    cache keeps (an explicit one; else, when entries must be evicted, the disk the cache is
    on), and the data's fingerprint, computed here once for every trial."""
    if cache is None or plan.policy == "none":
        return {"cache_policy": "none"}
    budget = plan.budget_bytes if explicit else None
    if not explicit and plan.evicts and plan.budget_bytes is not None:
        budget = plan.budget_bytes + usage(Store(cache))[0]  # free space + what is there
    block_set = plan.policy == "block-set"
    logger.info("fingerprinting the data files of %s (%s)", data, data_hash)
    return {"cache_policy": plan.policy, "cache_budget": budget,
            "store_pool": plan.store_pool if block_set else None,
            "extra_blocks": tuple(plan.blocks) if block_set else (),
            "data_hash": data_hash,
            "data_files": tuple(split_files_fingerprints(data, data_hash=data_hash).items())}


def extract_first(space: Space, plan: Plan, runtime: RuntimeOptions, *,
                  echo: Echo = _log) -> None:
    """Extract what the plan foresees, sharded over the cluster, before the first trial
    (when there is more than one worker; else trials extract on a miss, as they always do)."""
    if runtime.cache is None or runtime.cache_policy == "none":
        return
    if runtime.image_rungs:
        logger.info("extraction: per trial (rungs over images: each trial extends the "
                    "entries it reads to the images of its rung)")
        return
    cpu_trials = not float(space.search.get("gpus_per_trial") or 0)
    workers = cluster_workers(gpus=not cpu_trials)
    reason = why_not(plan, space, workers)
    if reason:
        logger.info("extraction: per trial (%s)", reason)
        return
    echo(f"extracting the plan's entries first on {workers.describe()}")
    # progress lines (images/s, time left) on the search's console, as the trials' are
    counts = extract_plan(space, plan, cache=runtime.cache, workers=workers, progress=False,
                          lines_s=runtime.progress_s,
                          store_pool=runtime.store_pool, extra_blocks=runtime.extra_blocks,
                          budget=runtime.cache_budget, data_files=dict(runtime.data_files),
                          data_hash=runtime.data_hash, batch_size=runtime.extract_batch)
    echo(f"extracted {counts['written']} entries ({counts['reused']} already stored, "
         f"{counts['images']} images) in {counts['wall_s']:.1f} s")


def extract_space(space_name: str, *, model: str | None = None, checkpoint: str | None = None,
                  data: str | None = None, cache: str | None = None,
                  cache_budget: str | None = None, address: str | None = None,
                  data_hash: str = "size", batch_size: int | None = None,
                  echo: Echo = _log) -> tuple[Plan, dict[str, Any]]:
    """``difftune extract --space``: every entry the space's plan foresees (its timesteps x
    its block set at its cache pool, train and val), sharded over the Ray cluster at
    ``address``, else in this process. The plan's summary goes to ``echo`` first; a plan over
    its budget, or one that foresees nothing, is refused before anything is extracted.

    :return: the plan and :func:`~.extract.extract_plan`'s counts."""
    spec = load_space(space_name, model=model, checkpoint=checkpoint, data=data)
    cache = cache or default_root()
    if "://" not in cache:
        cache = os.path.abspath(cache)
    budget, source, explicit = resolve_budget(cache_budget, spec, cache)
    plan = make_plan(spec, data_size(spec), budget=budget, budget_source=source, cache=cache)
    echo(plan.summary())
    refuse_if_over(plan)
    reason = why_not(plan, spec, None)
    if reason:
        raise UserError(f"--space {space_name}: nothing to extract ahead ({reason}); trials "
                        "extract what they ask")
    workers = None
    if address:
        ensure_ray(address)
        workers = cluster_workers()
        echo(f"extract: {workers.describe()} on the Ray cluster")
    opts = cache_options(plan, cache, explicit, data_hash, spec.data)
    counts = extract_plan(spec, plan, cache=cache, workers=workers,
                          store_pool=opts["store_pool"], extra_blocks=opts["extra_blocks"],
                          budget=opts["cache_budget"], data_files=dict(opts["data_files"]),
                          data_hash=data_hash,
                          batch_size=batch_size or spec.search.get("extract_batch"),
                          record_throughput=True)  # a worker's rate, for difftune plan
    return plan, counts


def extract_entries(*, model: str, checkpoint: str | None, data: str, timesteps: list[int],
                    blocks: list[int], pool: int, splits: list[str], cache: str | None = None,
                    batch_size: int | None = None, seed: int = 0, views: int = 1,
                    holdout: float = 0.1, label_fraction: str | None = None,
                    device: str = "cpu", channels_last: bool = False,
                    data_hash: str = "size") -> FeatureCache:
    """``difftune extract``: run the U-Net once over ``data`` at ``timesteps`` and store
    ``blocks`` pooled to ``pool`` in the feature cache (entries already stored are reused;
    the rate measured is recorded for ``difftune plan``). The blocks, timesteps and pool are
    checked against the model first. Returns the cache, its ``stats`` counted."""
    check_pool(pool)
    unet, diffusion = shared_unet(model, checkpoint, device)
    blocks = check_blocks(unet, blocks)
    for t in timesteps:
        check_timestep(diffusion, t)
    cfg = TrialConfig.from_dict({"model": model, "checkpoint": checkpoint, "data": data,
                                 "label_fraction": label_fraction, "noise_seed": seed,
                                 "views": views, "holdout": holdout})
    requests = clamp_requests(unet, [(t, b, pool) for t in timesteps for b in blocks])
    fc = FeatureCache(cache or default_root(), device=device, batch_size=batch_size,
                      extra_blocks=blocks, progress=True, channels_last=channels_last,
                      data_hash=data_hash, record_throughput=True)
    fc.prepare(cfg, requests, splits)
    return fc
