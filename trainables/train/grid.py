"""A grid inside a trial: many heads trained in one pass over the same features.

A space's ``grid:`` (``{lr: [1.0e-4, 1.0e-3, 1.0e-2], weight_decay: [0.0, 1.0e-4]}``) makes each
trial train every combination of the listed values on its features at once (dinov2's linear
evaluation does this with 13 learning rates x 2 poolings x 2 block counts): one
``ModuleDict`` of heads (:mod:`.grid_heads`), one optimizer with a param group per head, the
losses summed, one backward (:func:`~.loop.train_heads`, which trains a single head as a
grid of one). Ray Tune and Optuna search what cannot share
a pass; the grid's values are not Optuna parameters.

What a grid may vary: what one param group may hold (``lr``, ``weight_decay``, ``momentum``)
and the head settings that do not change what the head reads (``hidden``, ``dropout`` of the
MLP; ``dim``, ``heads``, ``depth``, ``mlp_ratio``, ``norm`` of the attention head and
DifFormer), for the heads that read them. What changes the features (block, t, pool,
pre_pool, blocks, timesteps) or the shared pass (epochs, batch size, optimizer, schedule,
seed) stays one value per trial. DifFeed runs the live U-Net per head and takes no grid.

The grid's best head follows :mod:`difftune.search.records.best`'s rule for trials that all ran the
same epochs: the best finite value of the search's metric at the epoch, ties to the earlier
grid point (points are numbered in the order :meth:`Grid.points` lists them).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from difftune.trainables.errors import ConfigError
from difftune.trainables.heads import head_kind

#: settings every head's param group holds: any grid may vary them
GROUP_SETTINGS = ("lr", "weight_decay", "momentum")
#: head settings a grid may vary for the heads that read them (they change the head, not
#: what it reads)
HEAD_SETTINGS = ("hidden", "dropout", "dim", "heads", "depth", "mlp_ratio", "norm")
#: metrics every head of a grid has per epoch (the grid's best is chosen by one of them)
HEAD_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "gflops")
#: keys a grid trial adds to its reported metrics
GRID_BEST = "grid_best"  # JSON object: the best head's grid point
GRID_INDEX = "grid_index"  # its number in Grid.points()
GRID_SIZE = "grid_size"
GRID_RESULTS = "grid_results"  # JSON list: every head's point and metrics at this epoch
MODES = ("max", "min")


class GridError(ConfigError):
    """A grid that cannot be trained."""


def grid_keys(head: str) -> tuple[str, ...]:
    """The settings a grid may vary for heads of kind ``head``; :class:`GridError` for a
    kind that takes no grid (DifFeed)."""
    kind = head_kind(head)
    if kind.live_unet:
        raise GridError(f"grid: head {head} runs the live U-Net and trains one head per trial; "
                        "remove grid: or this head from the space")
    return GROUP_SETTINGS + tuple(s for s in HEAD_SETTINGS if s in kind.settings)


@dataclass(frozen=True)
class Grid:
    """The values a trial's heads take, and how the best of them is chosen.

    :param axes: setting -> its values, in order; the points are their product, the last
        setting varying fastest.
    :param metric: the metric that picks the best head (one of :data:`HEAD_METRICS`).
    :param mode: ``max`` or ``min``.
    """

    axes: dict[str, list[Any]] = field(default_factory=dict)
    metric: str = "val_top1"
    mode: str = "max"

    def __post_init__(self) -> None:
        if not self.axes:
            raise GridError("grid: give at least one setting with a list of values, e.g. "
                            "grid: {lr: [0.001, 0.01, 0.1]}")
        for name, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise GridError(f"grid.{name} must be a non-empty list of values; got {values!r}")
        if self.metric not in HEAD_METRICS:
            raise GridError(f"metric={self.metric!r}: a grid picks its best head by a "
                            f"per-head metric; allowed: {list(HEAD_METRICS)}")
        if self.mode not in MODES:
            raise GridError(f"mode={self.mode!r} is invalid; allowed: {list(MODES)}")

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the axes' values, as ``{setting: value}``."""
        names = list(self.axes)
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.axes.values())]

    def to_dict(self) -> dict[str, Any]:
        return {"axes": {k: list(v) for k, v in self.axes.items()}, "metric": self.metric,
                "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(axes=dict(d["axes"]), metric=d.get("metric", "val_top1"),
                   mode=d.get("mode", "max"))


def label(point: dict[str, Any]) -> str:
    """``lr=0.01 weight_decay=0``: a grid point in one line."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in point.items())


def best_index(scores: Sequence[float | None], mode: str) -> int | None:
    """Index of the best finite score (``mode`` max or min), ties to the earlier one; None
    when no score is finite."""
    if mode not in MODES:
        raise GridError(f"mode={mode!r} is invalid; allowed: {list(MODES)}")
    sign = -1.0 if mode == "max" else 1.0
    eligible = [(sign * s, i) for i, s in enumerate(scores)
                if s is not None and math.isfinite(s)]
    return min(eligible)[1] if eligible else None


def with_point(config: dict[str, Any], reported: dict[str, Any] | str | None) -> dict[str, Any]:
    """A trial's settings with its best grid point put in: the plain config of the head it
    reported. ``reported`` is the point or its JSON (:data:`GRID_BEST`); None leaves the
    settings as they are."""
    if not reported:
        return dict(config)
    point = json.loads(reported) if isinstance(reported, str) else reported
    return {**config, **point}
