"""The Ray Tune function trainable: the only module of ``trainables`` that imports Ray.

Ray hands the trial a plain dict (Optuna's parameter names, see ``search.space``); it is
decoded into a :class:`TrialConfig` (an unknown key fails loudly), the head is trained on its
features, and every epoch is reported with a checkpoint of the head.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrialConfig

logger = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
META_FILE = "meta.json"


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
    """

    cache: str | None = None
    online: bool = False
    store_pool: int | None = None
    extra_blocks: tuple[int, ...] = field(default_factory=tuple)
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_blocks"] = list(self.extra_blocks)
        return d


def decode_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn Optuna parameter names back into trial settings.

    ``HEAD:NAME`` -> ``NAME``; ``NAME@VALUE`` booleans -> ``NAME: [VALUE, ...]``; list choices
    (JSON strings such as ``"[256, 256]"``) -> lists.
    """
    out: dict[str, Any] = {}
    subsets: dict[str, list[int]] = {}
    # a head's own sub-space wins over a top-level setting of the same name
    for key, value in sorted(raw.items(), key=lambda kv: ":" in kv[0]):
        name = key.split(":", 1)[-1]
        if "@" in name:
            base, member = name.split("@", 1)
            subsets.setdefault(base, [])
            if value:
                subsets[base].append(int(member))
            continue
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        out[name] = value
    for base, members in subsets.items():
        out[base] = sorted(members)
    return out


def make_source(runtime: RuntimeOptions, device: str):
    """The feature source for ``runtime``."""
    from .pipeline import DirectFeatures

    if runtime.online:
        from .online import OnlineFeatures

        return OnlineFeatures(device=device)
    if runtime.cache:
        from .cache import FeatureCache

        return FeatureCache(runtime.cache, device=device, store_pool=runtime.store_pool,
                            extra_blocks=runtime.extra_blocks)
    return DirectFeatures(device=device)


def unet_images(source) -> int:
    """Images this trial's feature source has passed through the U-Net so far."""
    stats = getattr(source, "stats", None)
    if isinstance(stats, dict):
        return int(stats.get("forward_images", 0))
    if stats is not None:
        return int(stats.forward_images)
    extractor = getattr(source, "extractor", None)
    return extractor.forward_images if extractor is not None else 0


def save_head(path: Path, head: torch.nn.Module, cfg: TrialConfig, *, epoch: int,
              shapes: dict, num_classes: int, optimizer=None, scheduler=None) -> None:
    """Write a head checkpoint folder: ``head.pt`` (tensors only) + ``meta.json``."""
    state = {"head": head.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, path / HEAD_FILE)
    meta = {"config": cfg.to_dict(), "epoch": epoch, "num_classes": num_classes,
            "shapes": [[list(k), list(v)] for k, v in shapes.items()]}
    (path / META_FILE).write_text(json.dumps(meta, indent=1))


def load_head(path: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, TrialConfig, dict]:
    """Rebuild a head from a checkpoint folder (``weights_only=True``)."""
    from .heads import build_head

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    cfg = TrialConfig.from_dict(meta["config"])
    shapes = {tuple(k): tuple(v) for k, v in meta["shapes"]}
    head = build_head(cfg, shapes, meta["num_classes"])
    state = torch.load(path / HEAD_FILE, map_location=device, weights_only=True)
    head.load_state_dict(state["head"])
    return head, cfg, {"meta": meta, "state": state}


def _device() -> str:
    import ray

    try:
        gpus = ray.get_gpu_ids()
    except Exception:  # not inside a Ray worker
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def train_trial(config: dict[str, Any], runtime: RuntimeOptions | None = None) -> None:
    """Ray Tune function trainable: one trial = one head on one feature setting."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    import ray
    from ray import tune

    from .pipeline import run_trial

    runtime = runtime or RuntimeOptions()
    cfg = TrialConfig.from_dict(decode_config(config))
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    device = _device()
    head_state = optimizer_state = None
    start_epoch = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / HEAD_FILE, map_location="cpu", weights_only=True)
            meta = json.loads((Path(d) / META_FILE).read_text())
        head_state, start_epoch = state["head"], int(meta["epoch"])
        optimizer_state = {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}
        logger.info("resuming trial at epoch %d", start_epoch)

    shapes_holder: dict[str, Any] = {}

    source = make_source(runtime, device)
    # recorded on the trial's MLflow run; outside Ray, get_runtime_context() would start one
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def on_epoch(epoch: int, metrics: dict[str, float], head, opt, sched) -> None:
        from .online import OnlineHead

        inner = head.head if isinstance(head, OnlineHead) else head
        with tempfile.TemporaryDirectory() as d:
            save_head(Path(d), inner, cfg, epoch=epoch, shapes=shapes_holder.get("shapes", {}),
                      num_classes=shapes_holder.get("num_classes", 0), optimizer=opt, scheduler=sched)
            report = {**metrics, "unet_images": unet_images(source), "node_id": node_id}
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    run_trial(cfg, source=source, device=device, on_epoch=on_epoch,
              head_state=head_state, optimizer_state=optimizer_state, start_epoch=start_epoch,
              on_data=shapes_holder.update)
