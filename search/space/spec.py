"""Search spaces: YAML files turned into an Optuna define-by-run function for OptunaSearch.

A space file (see ``spaces/demo.yaml``) has these top-level keys::

    description: free text
    model: demo | paper256 | PATH     checkpoint: PATH or null     data: digits | PATH
    label_fraction, holdout, bad_images: which images train and select (see trainables.data)
    search:  trials, seed, metric (val_top1 | val_top5 | val_loss), mode (max | min; default:
             min for val_loss, else max), scheduler {grace_period, reduction_factor},
             max_concurrent, cpus_per_trial, gpus_per_trial, max_failures, cache_pool, prior,
             objectives: [{metric: val_top1, mode: max}, {metric: gflops, mode: min}]
               (a multi-objective search: Optuna's multi-objective TPE; the first objective
               is the one ASHA stops trials by and the champion is chosen by)
             cache_policy (auto | block-set | per-request), cache_budget (e.g. 2TB),
             extract_batch, confirm_top, confirm_label_fraction
    fixed:   trial settings that are not searched (epochs, batch_size, ...)
    params:  searched settings, each one of
               {choice: [a, b, ...]}                    categorical (lists allowed as values)
               {int: [lo, hi], step: s, log: bool}      integer range (inclusive)
               {float: [lo, hi], step: s, log: bool}    float range
               {subset: [a, b, ...], min: 1}            a subset of at least min members (e.g.
                                                        DifFormer blocks)
             ``head: {choice: {linear: {}, mlp: {hidden: ...}}}`` gives each head type its own
             conditional sub-space (suggested only when that head is chosen).
    grid:    settings every trial trains all values of at once, in one pass over its features
             (``{lr: [0.001, 0.01, 0.1], weight_decay: [0.0, 1.0e-4]}``; not Optuna
             parameters; see :mod:`difftune.trainables.train.grid` for what a grid may vary)
    paper_config: the paper's best trial, enqueued first when it lies inside the space

The Optuna side (define-by-run, the paper's config as a point) is :mod:`.distributions`;
parameter names are spelled by :mod:`difftune.trainables.params`; the checks of a space's
values (numbers, ranges, search settings, objectives) are :mod:`.checks`, of its grid
:mod:`.grid`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from difftune.search.space import distributions
from difftune.search.space.checks import (
    TRIAL_KEYS,
    SpaceError,
    all_settings,
    check_label_fraction,
    check_objectives,
    check_params,
    check_scheduler,
    check_search,
    safe_load,
    values_of,
)
from difftune.search.space.grid import check_grid, grid_axes
from difftune.search.space.paths import MODEL_PRESETS, user_path
from difftune.trainables.config import TrialConfig, check_setting
from difftune.trainables.data.order import DEFAULT_STEPS
from difftune.trainables.errors import UserError
from difftune.trainables.heads import HEAD_TYPES, checked_config
from difftune.trainables.model.unet import model_geometry
from difftune.trainables.train.grid import Grid

logger = logging.getLogger(__name__)

TOP_KEYS = {"description", "model", "checkpoint", "data", "label_fraction", "holdout",
            "bad_images", "search", "fixed", "params", "paper_config", "grid"}
#: the data settings a space may give at its top level (each is also a trial setting)
DATA_KEYS = ("label_fraction", "holdout", "bad_images")
SEARCH_DEFAULTS: dict[str, Any] = dict(
    trials=20, seed=0, metric="val_top1", mode=None, grace_period=1, reduction_factor=2,
    max_concurrent=2, cpus_per_trial=1.0, gpus_per_trial=None, max_failures=2, cache_pool=None,
    objectives=None,
    cache_policy="auto", cache_budget=None, extract_batch=None, confirm_top=0,
    confirm_label_fraction=None, prior="none", image_rungs=None, image_floor=5,
    rung_steps=DEFAULT_STEPS, probe_rung=False,
)
BLOCK_KEYS = ("block", "blocks", "feedback_blocks")
TIME_KEYS = ("t", "timesteps")


@dataclass
class Space:
    """A loaded, validated search space."""

    name: str
    model: str
    data: str
    checkpoint: str | None
    label_fraction: float | str | None
    search: dict[str, Any]
    fixed: dict[str, Any]
    params: dict[str, dict]
    paper_config: dict[str, Any] | None = None
    description: str = ""
    holdout: float | None = None
    bad_images: str | None = None
    num_blocks: int = 0
    num_timesteps: int = 0
    middle_block: int = 0
    raw: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] | None = None

    # ---- Optuna -------------------------------------------------------------------------
    def define_by_run(self, trial) -> dict[str, Any]:
        """Suggest one trial's parameters; returns the constant settings."""
        const: dict[str, Any] = {"model": self.model, "data": self.data,
                                 "checkpoint": self.checkpoint, **self.data_settings(),
                                 **self.fixed}
        return distributions.suggest(trial, self.params, const)

    def data_settings(self) -> dict[str, Any]:
        """The top-level data settings every trial gets (label_fraction, and holdout /
        bad_images when the space gives them)."""
        out: dict[str, Any] = {"label_fraction": self.label_fraction}
        for k in ("holdout", "bad_images"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def point(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Optuna parameter values for a trial config, or None if it is not in the space."""
        return distributions.point(self.params, self.fixed, config)

    def setting(self, name: str) -> Any:
        """The value every trial of the space has for a data setting (fixed or top level),
        else TrialConfig's default."""
        if name in self.fixed:
            return self.fixed[name]
        value = self.data_settings().get(name)
        return value if value is not None else TrialConfig.__dataclass_fields__[name].default

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        """What Optuna runs first: the paper's config (when inside the space), then, with
        ``search: {prior: paper}``, startup points drawn from the paper's prior."""
        points = []
        if self.paper_config:
            p = self.point(self.paper_config)
            if p is None:
                logger.info("the paper's config %s is not inside this space; not enqueued",
                            self.paper_config)
            else:
                points.append(p)
        if self.search.get("prior") == "paper":
            points += distributions.prior_points(
                self.params, num_blocks=self.num_blocks, middle=self.middle_block,
                n=distributions.startup_trials(self.search["trials"]),
                seed=int(self.search["seed"]))
        return points

    def block_set(self) -> tuple[int, ...]:
        """Every block number the space can ask for (a cache miss extracts them all)."""
        blocks: set[int] = set()
        for key, values, _ in all_settings(self):
            if key in BLOCK_KEYS:
                for v in values:
                    blocks.update(v if isinstance(v, list) else [v])
        spec = self.params.get("block", {})
        if "int" in spec:  # a range: every block in it, not only its ends
            lo, hi = spec["int"]
            blocks.update(range(lo, hi + 1))
        return tuple(sorted(blocks))

    def head_types(self) -> list[str]:
        """Every head type a trial of the space can have."""
        head = self.params.get("head")
        if head is not None:
            return list(head["choice"])
        return [self.fixed.get("head", TrialConfig.head)]

    def objectives(self) -> list[dict[str, str]]:
        """``[{metric, mode}, ...]``: the search's objectives (one unless ``objectives:``)."""
        return list(self.search.get("objectives") or
                    [{"metric": self.search["metric"], "mode": self.search["mode"]}])

    def grid_spec(self) -> Grid | None:
        """The grid every trial trains (None: one head per trial)."""
        if not self.grid:
            return None
        return Grid(axes=dict(self.grid), metric=self.search["metric"], mode=self.search["mode"])

    def values(self, head: str) -> dict[str, list[Any]]:
        """Every value each setting can take in a trial of ``head`` (integer ranges expanded;
        a subset's members, each of which a trial may hold; a float range's ends)."""
        out: dict[str, list[Any]] = {k: [v] for k, v in self.fixed.items()}
        specs = {k: v for k, v in self.params.items() if k != "head"}
        sub = self.params.get("head", {}).get("choice")
        if isinstance(sub, dict):
            specs.update(sub.get(head) or {})
        for k, spec in specs.items():
            if "int" in spec:
                lo, hi = spec["int"]
                out[k] = list(range(lo, hi + 1, int(spec.get("step") or 1)))
            else:
                out[k] = values_of(spec)
        return out

    def max_epochs(self) -> int:
        """The most epochs a trial runs."""
        if "epochs" in self.fixed:
            return int(self.fixed["epochs"])
        spec = self.params.get("epochs", {})
        vals = spec.get("choice") or spec.get("int") or [TrialConfig().epochs]
        return int(max(vals))

    def names(self) -> set[str]:
        """Every setting name the space mentions (params, head sub-spaces, fixed)."""
        out = set(self.params) | set(self.fixed)
        head = self.params.get("head", {})
        if isinstance(head.get("choice"), dict):
            for sub in head["choice"].values():
                out |= set(sub or {})
        return out

    def resolved(self) -> dict[str, Any]:
        """The space as a plain dict (what the parent MLflow run records)."""
        return {"name": self.name, "description": self.description, "model": self.model,
                "checkpoint": self.checkpoint, "data": self.data,
                "label_fraction": self.label_fraction, "holdout": self.holdout,
                "bad_images": self.bad_images, "search": self.search,
                "fixed": self.fixed, "params": self.params, "paper_config": self.paper_config,
                "grid": self.grid}


# ---- loading ------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("difftune.spaces").iterdir()
                  if p.name.endswith(".yaml"))


def read_space_file(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Read a preset by name or a YAML file by path (``yaml.safe_load``)."""
    if name_or_path in preset_names():
        text = resources.files("difftune.spaces").joinpath(f"{name_or_path}.yaml").read_text()
        name = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpaceError(f"--space {name_or_path!r} is neither a preset "
                             f"({', '.join(preset_names())}) nor an existing YAML file")
        text, name = path.read_text(), path.stem
    try:
        raw = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpaceError(f"space {name_or_path} is not valid YAML{where}: "
                         f"{getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"space {name_or_path} must be a YAML mapping with keys {sorted(TOP_KEYS)}")
    return name, raw


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` strings -> {name: value}; values are parsed as YAML scalars/lists."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SpaceError(f"--set {item!r} must look like NAME=VALUE (e.g. --set head=mlp)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = safe_load(v)
        except yaml.YAMLError:
            raise SpaceError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def load_space(
    name_or_path: str = "demo",
    *,
    model: str | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    search_overrides: dict[str, Any] | None = None,
) -> Space:
    """Load, override and validate a space against its model. Raises :class:`SpaceError`."""
    name, raw = read_space_file(name_or_path)
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SpaceError(f"space {name}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    raw = copy.deepcopy(raw)
    search = dict(SEARCH_DEFAULTS)
    given_search = raw.get("search") or {}
    bad = sorted(set(given_search) - set(SEARCH_DEFAULTS))
    if bad:
        raise SpaceError(f"space {name}: unknown search setting(s) {bad}; "
                         f"allowed: {sorted(SEARCH_DEFAULTS)}")
    search.update(given_search)
    flags = {k: v for k, v in (search_overrides or {}).items() if v is not None}
    search.update(flags)
    if search["mode"] is None:  # the direction of the metric
        search["mode"] = "min" if search["metric"] == "val_loss" else "max"
    check_search(name, search, flags)
    check_objectives(name, search, given_search)
    # every path a user gives is made absolute here, once, on the driver: trials run in
    # other working directories (Ray's), where a relative path names nothing
    space = Space(
        name=name,
        model=user_path(model or raw.get("model") or "demo", keep=MODEL_PRESETS),
        checkpoint=user_path(checkpoint if checkpoint is not None else raw.get("checkpoint")),
        data=user_path(data or raw.get("data") or "digits", keep=("digits",)),
        label_fraction=user_path(raw.get("label_fraction")),
        search=search,
        fixed=dict(raw.get("fixed") or {}),
        params=dict(raw.get("params") or {}),
        paper_config=raw.get("paper_config"),
        description=raw.get("description", ""),
        holdout=raw.get("holdout"),
        bad_images=raw.get("bad_images"),
        raw=raw,
        grid=grid_axes(raw.get("grid"), f"space {name}"),
    )
    if "label_fraction" in space.fixed:
        space.fixed["label_fraction"] = user_path(space.fixed["label_fraction"])
    for k in space.fixed:
        if k not in TRIAL_KEYS:
            raise SpaceError(f"space {name}: fixed.{k} is not a trial setting; "
                             f"allowed: {sorted(TRIAL_KEYS)}")
    if space.label_fraction is not None:
        check_label_fraction(name, space.label_fraction)
    check_params(space.params, f"space {name}: params")
    if overrides:
        _apply_pins(space, overrides)
    _validate_against_model(space)
    check_grid(space, f"space {space.name}")
    check_scheduler(space, overrides or {})
    return space


def _validate_against_model(space: Space) -> None:
    geo = model_geometry(space.model, space.checkpoint)
    n, steps, middle = geo.num_blocks, geo.steps, geo.middle
    space.num_blocks, space.num_timesteps, space.middle_block = n, steps, middle
    for key, values, where in all_settings(space):
        flat = []
        for v in values:
            flat += v if isinstance(v, list) else [v]
        if key in BLOCK_KEYS:
            lo = middle + 1 if key == "feedback_blocks" else 1
            for b in flat:
                if not isinstance(b, int) or not lo <= b <= n:
                    raise SpaceError(f"{where}: block {b!r} is out of range; model "
                                     f"{space.model} has blocks {lo}..{n}"
                                     + (" (decoder blocks)" if lo > 1 else ""))
        elif key in TIME_KEYS:
            for t in flat:
                if not isinstance(t, int) or not 0 <= t < steps:
                    raise SpaceError(f"{where}: timestep {t!r} is out of range; allowed 0..{steps - 1}")
        elif key == "head":
            bad = [h for h in flat if h not in HEAD_TYPES]
            if bad:
                raise SpaceError(f"{where}: unknown head type(s) {bad}; allowed: {list(HEAD_TYPES)}")
        if key != "head":
            for v in values:  # every value (range end) as a trial reads it, in its range
                try:
                    check_setting(key, v)
                except UserError as exc:
                    raise SpaceError(f"space {space.name}: {where}: {exc}") from None
    # the fixed settings with each head's defaults must make a valid trial config
    try:
        checked_config({**{k: v for k, v in space.data_settings().items()
                                  if v is not None}, **space.fixed})
    except UserError as exc:
        raise SpaceError(f"space {space.name}: fixed: {exc}") from None


def _apply_pins(space: Space, pins: dict[str, Any]) -> None:
    """``--set``: pin a searched setting to one value (or override a fixed one)."""
    allowed = space.names() | TRIAL_KEYS
    for k, v in pins.items():
        if k not in allowed:
            raise SpaceError(f"--set {k}: the space {space.name} has no setting {k!r}; "
                             f"allowed: {sorted(allowed)}")
        if space.grid and k in space.grid:  # a pinned setting leaves the grid
            del space.grid[k]
            space.grid = space.grid or None
        if k == "head" and isinstance(space.params.get("head", {}).get("choice"), dict):
            choices = space.params["head"]["choice"]
            if v not in HEAD_TYPES:
                raise SpaceError(f"--set head={v!r}: unknown head type; allowed: {list(HEAD_TYPES)}")
            space.params["head"] = {"choice": {v: choices.get(v) or {}}}
            continue
        if k in space.params:
            del space.params[k]
        head = space.params.get("head", {})
        if isinstance(head.get("choice"), dict):
            for sub in head["choice"].values():
                if sub and k in sub:
                    del sub[k]
        space.fixed[k] = user_path(v) if k == "label_fraction" else v
