"""The checks of a space's ``grid:`` (:mod:`difftune.trainables.train.grid`): settings that every
head type of the space takes in a grid, neither searched nor fixed, and grid points that make
valid trial configs; one line each (:class:`~.checks.SpaceError`)."""

from __future__ import annotations

from typing import Any

from difftune.search.space.checks import SpaceError
from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.trial import grid_configs


def grid_axes(raw: Any, where: str) -> dict[str, list] | None:
    """A space's ``grid:`` as ``{setting: [values]}`` (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{where}: grid must map settings to lists of values, e.g. "
                         "grid: {lr: [0.001, 0.01, 0.1]}")
    for k, v in raw.items():
        if not isinstance(v, list) or not v:
            raise SpaceError(f"{where}: grid.{k} must be a non-empty list of values; got {v!r}")
    return {k: list(v) for k, v in raw.items()}


def check_grid(space, where: str) -> None:
    """A grid's settings must be ones every head type of ``space`` takes in a grid, neither
    searched nor fixed, and each grid point must make a valid trial config."""
    if not space.grid:
        return
    taken = sorted({k for k in space.names() if k != "head"} & set(space.grid))
    if taken:
        raise SpaceError(f"{where}: grid: {taken} also set in params or fixed; a setting "
                         "is searched, fixed or in the grid, not two of them")
    try:
        spec = space.grid_spec()
        for head in space.head_types():
            grid_configs(TrialConfig.from_dict({**space.fixed, "head": head}), spec)
    except UserError as exc:
        raise SpaceError(f"{where}: {exc}") from None
