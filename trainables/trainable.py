"""The Ray Tune function trainable: the only module of ``trainables`` that imports Ray.

Ray hands the trial a flat dict (Optuna's parameter names, :mod:`.params`); it is resolved at
once into a :class:`~.trial.Trial` (an unknown key fails loudly), its heads are trained on
their features (:func:`~.pipeline.run`: a single head, or every head of a grid in one pass,
:mod:`.train.grid`), and every epoch is reported, in one callback, with a checkpoint of the
best head and its ``gflops`` (:func:`~.heads.checkpoint.save_epoch`): ``head.pt`` +
``meta.json`` hold that head alone, as a plain head of its grid point, and a grid's
``grid.pt`` beside them every head and the optimizer, to resume the grid.

Failures that would repeat are not retried: a loss that becomes NaN/inf (``diverged``; for a
grid, every head's), a configuration the trial cannot run (``config``) and an image that
cannot be decoded (``data``) end the trial at once with a last report ``{"failure": KIND,
"error": MESSAGE}`` (its metrics NaN, so no searcher or scheduler counts it as a score)
instead of an exception that Ray Tune would retry. Anything else (a lost worker, out of
memory, an I/O error) raises and is retried up to ``max_failures``.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from difftune.trainables.data.order import DEFAULT_FLOOR, DEFAULT_STEPS, Rung, ladder
from difftune.trainables.errors import DataError, UserError
from difftune.trainables.heads.checkpoint import (
    HEAD_FILE,
    META_FILE,
    load_head,
    read_resume,
    save_epoch,
)
from difftune.trainables.model.online import OnlineFeatures
from difftune.trainables.pipeline import DirectFeatures, FeatureSource, evaluate_on, run
from difftune.trainables.progress import DEFAULT_EVERY_S, PROGRESS_BOARD
from difftune.trainables.train.grid import Grid
from difftune.trainables.train.loop import Epoch, TrainingDiverged
from difftune.trainables.trial import resolve

logger = logging.getLogger(__name__)

__all__ = ["FAILURE_KEY", "HEAD_FILE", "META_FILE", "RuntimeOptions", "evaluate_checkpoint",
           "failure_kind", "make_source", "train_trial"]

#: the key of a trial's last report when it failed in a way a retry would repeat
FAILURE_KEY = "failure"
#: failures that stop the whole search at the first trial that meets them: an image that
#: cannot be decoded fails every trial that reads it, a full disk every trial that writes
STOP_ALL = ("data", "disk")
#: metrics a failure report carries as NaN (a scheduler or searcher needs its metric there)
FAILED_METRICS = ("val_top1", "val_top5", "val_loss")


def disk_full(exc: BaseException) -> OSError | None:
    """The "no space left on device" (or quota) error in ``exc`` or its causes, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in (errno.ENOSPC, errno.EDQUOT)
                                          or "No space left on device" in str(seen)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def failure_kind(exc: BaseException) -> str | None:
    """``diverged``, ``data``, ``config`` or ``disk`` (no space left) for a failure that
    repeats on every retry; None for one that may not (it is raised, and Ray Tune retries
    it)."""
    if isinstance(exc, TrainingDiverged):
        return "diverged"
    if disk_full(exc) is not None:
        return "disk"
    if isinstance(exc, DataError):
        return "data"
    if isinstance(exc, UserError):
        return "config"
    return None


@dataclass(frozen=True)
class RuntimeOptions:
    """How trials get their features; the same for every trial of a search.

    :param cache: feature cache folder or URI; None with ``online`` False extracts per trial.
    :param online: the paper's behaviour (``--no-cache``): the U-Net runs on every batch of
        every epoch with fresh noise.
    :param store_pool: pool size cache entries are stored at (serves every divisor).
    :param extra_blocks: blocks the search can ask for: a cache miss extracts them all.
    :param threads: torch CPU threads per trial (0: leave torch's default); a retrain with
        the same count gives the same numbers.
    :param cache_policy: ``block-set`` or ``per-request`` (:mod:`~.cache.policy`; what
        ``store_pool`` and ``extra_blocks`` implement), recorded for the parent run.
    :param cache_budget: bytes the cache root may hold (least recently used entries are
        evicted beyond it); None: no limit.
    :param data_files: split -> fingerprint of the data's files, computed once by the driver
        so that no trial walks the data (:func:`~.fingerprint.files_fingerprint`).
    :param data_hash: how those were computed (``size`` or ``content``).
    :param extract_batch: images per U-Net pass on a cache miss; None: what fits the device.
    :param progress_s: seconds between the progress lines of a long extraction (posted to
        the search's :data:`~.progress.PROGRESS_BOARD` actor when there is one).
    :param image_rungs: the search's rungs over images (fractions of each split, the last
        1.0; empty: every trial reads every image): a trial trains at each in turn, and
        reports each rung's end at ``rung_budget`` (:meth:`~.data.order.Rung.budget`), where
        ASHA decides whether it goes on.
    :param image_floor: images per class a rung's sample holds at least.
    :param rung_factor: the scheduler's reduction factor (the rungs' ``rung_budget``).
    :param rung_steps: the fewest SGD steps an epoch at an early rung takes, its sample read
        again where it is small (:meth:`~.data.order.Rung.passes`).
    """

    cache: str | None = None
    online: bool = False
    store_pool: int | None = None
    extra_blocks: tuple[int, ...] = field(default_factory=tuple)
    threads: int = 0
    cache_policy: str = "block-set"
    cache_budget: int | None = None
    data_files: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    data_hash: str = "size"
    extract_batch: int | None = None
    progress_s: float = DEFAULT_EVERY_S
    image_rungs: tuple[float, ...] = field(default_factory=tuple)
    image_floor: int = DEFAULT_FLOOR
    rung_factor: float = 2.0
    rung_steps: int = DEFAULT_STEPS

    def rungs(self) -> list[Rung]:
        """The trials' :class:`~.data.order.Rung` ladder (empty without rungs)."""
        return ladder(self.image_rungs, floor=self.image_floor, factor=self.rung_factor,
                      min_steps=self.rung_steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_blocks"] = list(self.extra_blocks)
        d["data_files"] = dict(self.data_files)
        d["image_rungs"] = list(self.image_rungs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeOptions:
        """The inverse of :meth:`to_dict`; keys it does not know are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "extra_blocks": tuple(known.get("extra_blocks", ())),
                      "image_rungs": tuple(known.get("image_rungs") or ()),
                      "data_files": tuple(sorted(dict(known.get("data_files") or {}).items()))})


def make_source(runtime: RuntimeOptions, device: str,
                on_progress: Callable[[str], None] | None = None) -> FeatureSource:
    """The feature source for ``runtime``; ``on_progress`` takes the progress lines of long
    extractions."""
    if runtime.online:
        return OnlineFeatures(device=device)
    if runtime.cache:
        # imported when used: pyarrow stays off the path of a trial without a cache
        from difftune.trainables.cache.feature_cache import FeatureCache

        return FeatureCache(runtime.cache, device=device, store_pool=runtime.store_pool,
                            extra_blocks=runtime.extra_blocks, budget=runtime.cache_budget,
                            data_files=dict(runtime.data_files), data_hash=runtime.data_hash,
                            batch_size=runtime.extract_batch, on_progress=on_progress,
                            progress_s=runtime.progress_s)
    return DirectFeatures(device=device, batch_size=runtime.extract_batch or 256)


def _progress_sink() -> Callable[[str], None] | None:
    """Post progress lines to the search's :data:`~.progress.PROGRESS_BOARD` actor (the
    driver prints them), tagged with the trial's id; None outside such a search."""
    import ray
    from ray import tune

    try:
        board = ray.get_actor(PROGRESS_BOARD)
        trial_id = tune.get_context().get_trial_id()
    except Exception:  # no board (a search without a console), or not in a trial
        return None
    return lambda line: board.post.remote(trial_id, line)


def _device() -> str:
    import ray

    try:
        gpus = ray.get_gpu_ids()
    except Exception:  # not inside a Ray worker
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def train_trial(config: dict[str, Any], runtime: RuntimeOptions | None = None,
                grid: Grid | None = None) -> None:
    """Ray Tune function trainable: one trial = one head on one feature setting, or the
    heads of ``grid`` on it."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
    from ray import tune

    runtime = runtime or RuntimeOptions()
    try:
        _train(config, runtime, grid)
    except Exception as exc:
        kind = failure_kind(exc)
        if kind is None:
            raise  # transient (or a bug): Ray Tune retries it up to max_failures
        logger.warning("trial failed (%s, not retried): %s", kind, exc)
        tune.report({FAILURE_KEY: kind, "error": failure_message(exc, kind, cache=runtime.cache),
                     **dict.fromkeys(FAILED_METRICS, float("nan"))})


def failure_message(exc: BaseException, kind: str, *, cache: str | None = None) -> str:
    """The one line a failed trial reports; a full disk names its path and what to do."""
    full = disk_full(exc) if kind == "disk" else None
    if full is None:
        return str(exc).splitlines()[0][:1000]
    path = full.filename or cache
    where = f" writing {path}" if path else ""
    return (f"the disk is full{where} ({full.strerror or full}): free space on it, put "
            "--cache on a larger disk, or give a --cache-budget it can hold")[:1000]


def _train(config: dict[str, Any], runtime: RuntimeOptions, grid: Grid | None) -> None:
    import ray
    from ray import tune

    trial = resolve(config, grid)
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    device = _device()
    resume, start_rung = None, 0
    rungs = runtime.rungs()
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = read_resume(d, grid=grid is not None)
        start_rung = resume["rung"]
        logger.info("resuming trial at rung %d, epoch %d", start_rung, resume["epoch"])
        if rungs and resume["epoch"] >= trial.cfg.epochs:  # killed between two rungs
            start_rung, resume = start_rung + 1, None

    data: dict[str, Any] = {}
    source = make_source(runtime, device, on_progress=_progress_sink())
    # recorded on the trial's MLflow run; outside Ray, get_runtime_context() would start one
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def on_epoch(ep: Epoch) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_epoch(d, ep)
            report = {**ep.metrics, "gflops": ep.gflops,
                      "unet_images": source.unet_images + data["grid"].unet_images,
                      "node_id": node_id, **rung_metrics(ep, data)}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    run(trial, source=source, device=device, on_epoch=on_epoch, resume=resume,
        on_data=data.update, rungs=rungs, start_rung=start_rung)


def rung_metrics(ep: Epoch, data: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports of its rung over images: ``image_rung`` (0-based),
    ``image_fraction``, ``rung_images`` (train images it trained on) and ``rung_budget``
    (ASHA's time at rungs: the rung's end at ``factor ** index``); nothing without rungs."""
    rung = ep.rung
    if rung is None:
        return {}
    end = int(ep.metrics.get("epoch") or 0) >= ep.config.epochs
    return {"image_rung": rung.index, "image_fraction": rung.fraction,
            "rung_images": int(data.get("train_images") or 0),
            "rung_budget": rung.budget(end=end)}


def evaluate_checkpoint(checkpoint: Any, runtime: RuntimeOptions | dict[str, Any],
                        split: str = "test") -> dict[str, float]:
    """Evaluate a trial's head checkpoint once on ``split`` (the test split, after a search
    has chosen it): ``{<split>_top1, <split>_top5, <split>_loss}``. Runs where it is called
    (a Ray task with the trial's resources, on a GPU when it has one).

    :param checkpoint: a ``tune.Checkpoint`` or a checkpoint folder.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
    if isinstance(runtime, dict):
        runtime = RuntimeOptions.from_dict(runtime)
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    device = _device()
    if isinstance(checkpoint, str):
        head, cfg, _ = load_head(checkpoint, device=device)
    else:
        with checkpoint.as_directory() as d:
            head, cfg, _ = load_head(d, device=device)
    return evaluate_on(head, cfg, split, source=make_source(runtime, device), device=device)
