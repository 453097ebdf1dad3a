"""A trial's config resolved once into what the trial needs.

Ray Tune hands a trial a flat dict (:mod:`.params`); :func:`resolve` turns it (or a
:class:`~.config.TrialConfig`) into a :class:`Trial`: the checked config, its head kind (whose
own checks ran), the U-Net's flags and geometry, the ``(t, block, pool)`` maps its heads read
(pools clamped to the blocks' native maps) and the shapes those maps have, and one config per
head: a single head is a grid of one. The feature source, the heads (:func:`build_heads`),
the cost count (:func:`trial_gflops`) and the training loop take the trial, never the flat
config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import ConfigError
from difftune.trainables.heads import HeadKind, Key, Request, Shape, UNet, checked_config, head_kind
from difftune.trainables.model.cost import gflops_to, module_gflops, unet_costs
from difftune.trainables.model.geometry import Geometry, geometry_of_flags
from difftune.trainables.model.unet import build, full_flags
from difftune.trainables.model.unet import resolve as resolve_model
from difftune.trainables.params import decode
from difftune.trainables.train.grid import GROUP_SETTINGS, Grid, GridError, grid_keys, label
from difftune.trainables.train.grid_heads import HeadGrid, rng_state

logger = logging.getLogger(__name__)

__all__ = ["Trial", "build_heads", "grid_configs", "heads_gflops", "resolve", "trial_gflops"]


@dataclass(frozen=True)
class Trial:
    """What one trial needs, resolved once from its config.

    :param cfg: the trial's config (a grid trial's base config, before its points).
    :param kind: its head kind. :param flags: the U-Net's complete flags (fp32).
    :param geometry: the U-Net's blocks and steps.
    :param requests: the ``(t, block, pool)`` maps the heads read, each pool at most its
        block's native map side (empty for a live head, which reads images).
    :param shapes: ``(t, block) -> (C, p, p)`` of those maps: what the heads are built for.
    :param cfgs: one config per head, in grid-point order (a single head: ``(cfg,)``).
    :param points: each head's grid point (a single head: ``({},)``).
    :param grid: the trial's grid, None for a single head.
    :param steps: distinct timesteps the heads read: U-Net passes per image.
    """

    cfg: TrialConfig
    kind: HeadKind
    flags: dict[str, Any]
    geometry: Geometry
    requests: tuple[Request, ...]
    shapes: dict[Key, Shape]
    cfgs: tuple[TrialConfig, ...]
    points: tuple[dict[str, Any], ...]
    grid: Grid | None = None
    steps: int = 0


def grid_configs(base: TrialConfig, grid: Grid) -> list[TrialConfig]:
    """One plain trial config per point of ``grid``: ``base`` with the point's values, each
    checked as a trial's config, then by its head kind; :class:`~.train.grid.GridError`
    naming the point otherwise."""
    allowed = grid_keys(base.head)
    bad = sorted(set(grid.axes) - set(allowed))
    if bad:
        raise GridError(f"grid: head {base.head} does not take {bad} in a grid; allowed: "
                        f"{list(allowed)}")
    settings, points = base.to_dict(), grid.points()
    kind = head_kind(base.head)
    out = []
    for point in points:  # the config's checks for every point, then the head kind's
        try:
            cfg = TrialConfig.from_dict({**settings, **point})
        except ConfigError as exc:
            raise GridError(f"grid point {label(point)}: {exc}") from None
        out.append(cfg)
    for point, cfg in zip(points, out, strict=True):
        try:
            if kind.validate is not None:
                kind.validate(cfg)
        except ConfigError as exc:
            raise GridError(f"grid point {label(point)}: {exc}") from None
    return out


def resolve(config: dict[str, Any] | TrialConfig, grid: Grid | None = None) -> Trial:
    """The :class:`Trial` of ``config``: a trial's flat dict (Optuna's parameter names,
    decoded here) or a :class:`TrialConfig`; ``grid``: the heads the trial trains at once.

    Raises :class:`~.errors.ConfigError` for settings the trial cannot run with (the head
    kind's own checks included) and :class:`~.grid.GridError` for a grid it cannot train.
    """
    settings = config if isinstance(config, TrialConfig) else decode(config)
    if grid is None:
        cfg = checked_config(settings)
        cfgs, points = (cfg,), ({},)
    else:  # every point is checked, the head kind's checks included
        cfg = settings if isinstance(settings, TrialConfig) else TrialConfig.from_dict(settings)
        cfgs, points = tuple(grid_configs(cfg, grid)), tuple(grid.points())
    kind = head_kind(cfg.head)
    flags, _ = resolve_model(cfg.model, checkpoint=cfg.checkpoint)
    flags = {**full_flags(flags), "use_fp16": False}
    costs = unet_costs(flags)
    requests: tuple[Request, ...] = ()
    if not kind.live_unet:
        requests = tuple((t, b, min(p, costs[b].side)) if b in costs else (t, b, p)
                         for t, b, p in kind.requests(cfg))
    shapes = {(t, b): (costs[b].channels, p, p) for t, b, p in requests if b in costs}
    return Trial(cfg=cfg, kind=kind, flags=flags, geometry=geometry_of_flags(flags),
                 requests=requests, shapes=shapes, cfgs=cfgs, points=points, grid=grid,
                 steps=len({t for t, _, _ in requests}))


def _head_gflops(trial: Trial, cfg: TrialConfig, shapes: dict[Key, Shape],
                 num_classes: int) -> float:
    """GFLOPs per image of the head of ``cfg`` at inference, plus the U-Net passes its
    features need; counted on the meta device (the global random state is left as it was)."""
    kind = trial.kind
    with torch.random.fork_rng(), torch.device("meta"):
        if kind.live_unet:  # its U-Net passes are part of its forward
            model, diffusion = build(trial.flags)
            head = kind.build(cfg, shapes, num_classes, (model, diffusion)).eval()
            size = trial.geometry.image_size
            return module_gflops(head, {"image": torch.zeros(1, 3, size, size), "index": [0]})
        head = kind.build(cfg, shapes, num_classes, None).eval()
        head_flops = module_gflops(head, {k: torch.zeros(1, *s) for k, s in shapes.items()})
    blocks = sorted({b for _, b, _ in trial.requests})
    return trial.steps * gflops_to(unet_costs(trial.flags), blocks) + head_flops


def heads_gflops(trial: Trial, num_classes: int,
                 shapes: dict[Key, Shape] | None = None) -> list[float]:
    """:func:`trial_gflops` of each head of ``trial``, counted once per head architecture
    (the optimizer settings of a grid point do not change it)."""
    shapes = trial.shapes if shapes is None else shapes
    counted: dict[str, float] = {}
    out = []
    for cfg in trial.cfgs:
        arch = {k: v for k, v in asdict(cfg).items() if k not in GROUP_SETTINGS}
        key = json.dumps(arch, sort_keys=True, default=str)
        if key not in counted:
            counted[key] = _head_gflops(trial, cfg, shapes, num_classes)
        out.append(counted[key])
    return out


def trial_gflops(trial: Trial | TrialConfig, shapes: dict[Key, Shape] | None,
                 num_classes: int) -> float:
    """GFLOPs per image of what a trial computes at inference: one U-Net pass per timestep
    it reads, stopped after the deepest block it reads, plus its head on the maps of
    ``shapes`` ((t, block) -> (C, p, p); None: the trial's own). A head that runs the U-Net
    itself (DifFeed) is counted whole: its passes are part of its forward."""
    if not isinstance(trial, Trial):
        trial = resolve(trial)
    return _head_gflops(trial, trial.cfg, trial.shapes if shapes is None else shapes,
                        num_classes)


def build_heads(trial: Trial, shapes: dict[Key, Shape], num_classes: int, *,
                unet: UNet | None = None) -> HeadGrid:
    """The heads of ``trial`` (one per config of ``trial.cfgs``), each seeded by its
    ``seed`` as a trial of it alone, with their GFLOPs (:func:`heads_gflops`, counted first:
    building seeds the random state training starts from).

    A grid's heads each get their own random stream (started where a trial of that head
    alone would start it); a single head draws from the global one, as it always did.
    """
    gflops = heads_gflops(trial, num_classes, shapes)
    heads, streams = [], []
    for cfg in trial.cfgs:
        torch.manual_seed(cfg.seed)
        heads.append(trial.kind.build(cfg, shapes, num_classes, unet))
        streams.append(rng_state())  # where a trial of this head alone starts training
    grid = HeadGrid(heads, streams if trial.grid is not None else None, points=trial.points, shapes=shapes, num_classes=num_classes,
                    gflops=gflops)
    if grid.fused:
        logger.info("grid of %d heads: %d linear heads fused into %d batched matmul(s)",
                    len(grid), sum(len(g) for g in grid.fused), len(grid.fused))
    return grid
