"""The configuration of one trial, built from the plain dict Ray Tune hands a trial.

An unknown key is an error (a misspelled setting must fail loudly, never fall back to a
default), and so is a value of the wrong kind. This module knows no head: the settings of one
kind of head (its name included) are checked by that kind
(:func:`difftune.trainables.heads.checked_config`, run when a trial is resolved,
:func:`difftune.trainables.trial.resolve`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from difftune.trainables.data.datasets import BAD_IMAGES
from difftune.trainables.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")

__all__ = ["LIMITS", "OPTIMIZERS", "ConfigError", "Limit", "TrialConfig",
           "check_setting"]


@dataclass(frozen=True)
class Limit:
    """The allowed range of a numeric setting: ``low`` (and ``high``) inclusive unless open;
    integers only unless ``integer`` is False; never NaN or infinite."""

    low: float
    high: float | None = None
    integer: bool = True
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if value < self.low or (self.low_open and value == self.low):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


#: the allowed range of every numeric trial setting (list settings: of each element)
LIMITS: dict[str, Limit] = {
    "block": Limit(1), "t": Limit(0), "pool": Limit(1), "noise_seed": Limit(0),
    "hidden": Limit(1), "dropout": Limit(0, 1, integer=False, high_open=True),
    "dim": Limit(1), "heads": Limit(1), "depth": Limit(1),
    "mlp_ratio": Limit(0, integer=False, low_open=True), "pre_pool": Limit(1),
    "blocks": Limit(1), "timesteps": Limit(0), "feedback_blocks": Limit(1),
    "lr": Limit(0, integer=False, low_open=True), "momentum": Limit(0, 1, integer=False),
    "weight_decay": Limit(0, integer=False), "epochs": Limit(1), "batch_size": Limit(1),
    "step_size": Limit(1), "gamma": Limit(0, integer=False, low_open=True), "seed": Limit(0),
    "label_fraction": Limit(0, 1, integer=False, low_open=True),
    "holdout": Limit(0, 1, integer=False, low_open=True, high_open=True), "views": Limit(1),
}


@dataclass
class TrialConfig:
    """Everything one trial needs: what to extract, which head, how to train it."""

    # what to read
    model: str = "demo"
    checkpoint: str | None = None
    data: str = "digits"
    label_fraction: float | str | None = None
    holdout: float = 0.1  # share of an ImageFolder's train/ held out as the selection split
    bad_images: str = "stop"  # an unreadable image stops the search, or is skipped ("skip")
    block: int = 10
    t: int = 90
    pool: int = 2
    noise_seed: int = 0
    views: int = 1  # cached views per (train image, t); epoch e reads view e mod views
    # head
    head: str = "linear"
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
    # attention / DifFormer / DifFeed head settings
    dim: int = 1024
    heads: int = 8
    depth: int = 2
    mlp_ratio: float = 4.0
    pre_pool: int = 16
    norm: str = "layernorm"
    blocks: list[int] = field(default_factory=lambda: [19, 24, 30])
    timesteps: list[int] = field(default_factory=lambda: [90, 150, 300])
    feedback_blocks: list[int] = field(default_factory=lambda: [21, 24, 27, 30, 33, 36])
    feedback_arch: str = "C_B_R"
    # training (the paper's released recipe by default)
    optimizer: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 28
    batch_size: int = 32
    step_size: int = 7
    gamma: float = 0.1
    seed: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrialConfig:
        """Build from a trial dict; unknown keys and wrong types raise :class:`ConfigError`."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown trial setting(s) {unknown}; allowed: {sorted(known)}"
            )
        values = {k: _coerce(k, v, known[k]) for k, v in config.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings no trial can run with (whatever its head;
        each head kind checks its own settings, :func:`~difftune.trainables.heads.checked_config`)."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is unknown; allowed: {list(OPTIMIZERS)}")
        for name in LIMITS:
            _check_limit(name, getattr(self, name))
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(f"bad_images={self.bad_images!r} is invalid; allowed: "
                              f"{list(BAD_IMAGES)}")


def check_setting(name: str, value: Any) -> Any:
    """One trial setting as a trial reads it (see :func:`_coerce`), checked against its
    :data:`LIMITS`; :class:`ConfigError` naming the setting and what is allowed otherwise."""
    known = {f.name: f for f in fields(TrialConfig)}
    if name not in known:
        raise ConfigError(f"unknown trial setting {name!r}; allowed: {sorted(known)}")
    value = _coerce(name, value, known[name])
    _check_limit(name, value)
    return value


def _check_limit(name: str, value: Any) -> None:
    limit = LIMITS.get(name)
    if limit is None or value is None or isinstance(value, str):  # a label_fraction file
        return
    for v in value if isinstance(value, list) else [value]:
        if not limit.allows(v):
            shown = value if isinstance(value, list) else v
            raise ConfigError(f"{name}={shown!r} is invalid; allowed: {limit}"
                              + (" each" if isinstance(value, list) else ""))


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Accept what YAML/Optuna produce (ints as floats, tuples as lists); refuse the rest."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return None
    if name == "label_fraction":
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)  # a file listing the images to keep
    try:
        if isinstance(default, bool):
            return bool(value)
        if isinstance(default, int):
            return _integer(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, list):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):  # "19" must not become [1, 9]
                raise ValueError
            return [_integer(v) for v in value]
        if isinstance(default, str) or default is None:
            if not isinstance(value, (str, os.PathLike)):  # no str() of lists or dicts
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"trial setting {name}={value!r} has the wrong type")


def _integer(value: Any) -> int:
    """An int from an int, an integral float or a numeric string; bools and 2.5 are refused."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)
