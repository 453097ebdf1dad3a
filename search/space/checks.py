"""Checks of a search space's values, one line each (:class:`SpaceError`): numbers read as
numbers (YAML 1.2 floats: ``1e-3`` is a number), ranges of ``int``/``float`` specs, subsets
with their ``min``, the search settings (``search.objectives`` among them) and
``label_fraction`` in their allowed ranges.
The structure of a space and its fit to the model are checked in :mod:`.space`.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from difftune.trainables.config import TrialConfig, check_setting
from difftune.trainables.data.splits import is_number
from difftune.trainables.errors import UserError
from difftune.trainables.heads import HEAD_TYPES
from difftune.trainables.train.grid import HEAD_METRICS

#: the settings a trial reads (and a space may search or fix)
TRIAL_KEYS = {f.name for f in fields(TrialConfig)} - {"model", "checkpoint", "data"}
KINDS = ("choice", "int", "float", "subset")


class SpaceError(UserError):
    """A space file or a --set override is invalid."""


#: what a search may select on: a metric every trial reports on the val split, each epoch
METRICS = ("val_top1", "val_top5", "val_loss")
#: where a search's startup trials come from (search.space.distributions.prior_points)
PRIORS = ("none", "paper")

#: the allowed range of each numeric search setting: (check, what is allowed)
SEARCH_LIMITS: dict[str, tuple[Any, str]] = {
    "trials": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "grace_period": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (epochs)"),
    "reduction_factor": (lambda v: _is_num(v) and v > 1, "a number > 1"),
    "max_concurrent": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "cpus_per_trial": (lambda v: _is_num(v) and v > 0 and (v <= 1 or float(v).is_integer()),
                       "a number > 0 (a fraction up to 1, whole numbers above)"),
    "gpus_per_trial": (lambda v: v is None or (_is_num(v) and v >= 0 and (
        v <= 1 or float(v).is_integer())),
                       "a number >= 0 (a fraction up to 1, whole numbers above), or unset "
                       "for each head's own share"),
    "max_failures": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (retries per trial)"),
    "cache_pool": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1, or unset"),
    "metric": (lambda v: v in METRICS,
               f"one of {', '.join(METRICS)} (what every trial reports on val)"),
    "mode": (lambda v: v in ("max", "min"), "max or min (default: min for val_loss, else max)"),
    "prior": (lambda v: v in PRIORS, "none or paper"),
    "cache_policy": (lambda v: v in CACHE_POLICIES, "auto, block-set or per-request"),
    "cache_budget": (lambda v: v is None or _is_size(v),
                     "a size such as 500GB, 2TB or 1.5TiB, or unset (the free space)"),
    "extract_batch": (lambda v: v is None or (_is_int(v) and v >= 1),
                      "an integer >= 1, or unset (what fits the device)"),
    "confirm_top": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no confirm stage)"),
    "confirm_label_fraction": (lambda v: v is None or (_is_num(v) and 0 < v <= 1),
                               "a fraction in (0, 1], or unset (all labels)"),
    "image_rungs": (lambda v: v is None or v == [] or is_rungs(v),
                    "increasing fractions of each split in (0, 1] ending at 1.0, e.g. "
                    "[0.02, 0.1, 0.5, 1.0], or unset or [] (every trial reads every image)"),
    "image_floor": (lambda v: _is_int(v) and v >= 1,
                    "an integer >= 1 (images per class a rung's sample holds at least)"),
    "rung_steps": (lambda v: _is_int(v) and v >= 1,
                   "an integer >= 1 (the fewest SGD steps an epoch at an early rung takes; "
                   "1: its sample read once)"),
    "probe_rung": (lambda v: isinstance(v, bool), "true or false"),
}


def is_rungs(v: Any) -> bool:
    """``image_rungs`` as allowed: increasing fractions in (0, 1], the last 1 (at least one)."""
    if not isinstance(v, list) or not v or not all(_is_num(f) and 0 < f <= 1 for f in v):
        return False
    return v[-1] == 1 and all(a < b for a, b in zip(v, v[1:], strict=False))


#: what a cache miss stores (:mod:`difftune.trainables.cache.policy`); auto: the plan decides
CACHE_POLICIES = ("auto", "block-set", "per-request")


def _is_size(v: Any) -> bool:
    from difftune.search.space.sizes import parse_size

    try:
        parse_size(v)
    except UserError:
        return False
    return True


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return _is_num(v) and float(v).is_integer()


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2's floats: PyYAML (YAML 1.1) reads ``1e-3`` and ``1e3``
    (an exponent without a dot) as strings; here they are numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""", re.X),
    list("-+0123456789."))


def safe_load(text: str) -> Any:
    """Parse YAML with ``yaml.SafeLoader`` (no objects built) and YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def check_search(name: str, search: dict[str, Any], flags: dict[str, Any]) -> None:
    """Every search setting in its allowed range (:data:`SEARCH_LIMITS`); integral numbers
    become ints. A value given by a flag is named by the flag."""
    for key, (ok, allowed) in SEARCH_LIMITS.items():
        value = search[key]
        if not ok(value):
            who = (f"--{key.replace('_', '-')} {value}" if key in flags
                   else f"space {name}: search.{key}={value!r}")
            raise SpaceError(f"{who} is invalid; allowed: {allowed}")
        if _is_int(value) and key not in ("reduction_factor", "cpus_per_trial",
                                          "gpus_per_trial"):
            search[key] = int(value)
    if search.get("image_rungs") == []:
        search["image_rungs"] = None

def check_objectives(name: str, search: dict[str, Any], given: dict[str, Any]) -> None:
    """``search.objectives``: a list of ``{metric, mode}`` over the metrics trials report; the
    first becomes the search's ``metric`` and ``mode`` (what ASHA stops trials by, and the
    champion and ``export`` rank by). ``given`` is the ``search:`` mapping as written."""
    objectives = search.get("objectives")
    if objectives is None:
        return
    at = f"space {name}: search.objectives"
    example = "[{metric: val_top1, mode: max}, {metric: gflops, mode: min}]"
    if not isinstance(objectives, list) or not objectives:
        raise SpaceError(f"{at} must be a list of {{metric: NAME, mode: max|min}}, e.g. {example}")
    for i, obj in enumerate(objectives):
        if not isinstance(obj, dict) or set(obj) != {"metric", "mode"}:
            raise SpaceError(f"{at}[{i}] must be {{metric: NAME, mode: max|min}}; got {obj!r}")
        if obj["metric"] not in HEAD_METRICS:
            raise SpaceError(f"{at}[{i}]: metric {obj['metric']!r} is not one trials report; "
                             f"allowed: {list(HEAD_METRICS)}")
        if obj["mode"] not in ("max", "min"):
            raise SpaceError(f"{at}[{i}]: mode {obj['mode']!r} is invalid; allowed: max or min")
    metrics = [o["metric"] for o in objectives]
    if len(set(metrics)) != len(metrics):
        raise SpaceError(f"{at} names a metric twice: {metrics}")
    first = objectives[0]
    if first["metric"] not in METRICS:
        raise SpaceError(f"{at}[0]: the first objective is what ASHA stops trials by and the "
                         f"champion is chosen by on val; allowed: {list(METRICS)} (gflops or "
                         "train_loss may come after it)")
    for key in ("metric", "mode"):
        if key in given and given[key] != first[key]:
            raise SpaceError(f"space {name}: search.{key}={given[key]!r} differs from the first "
                             f"objective's ({first[key]!r}); drop search.{key} or reorder the "
                             "objectives")
    search["metric"], search["mode"] = first["metric"], first["mode"]
    search["objectives"] = [dict(o) for o in objectives]


def check_scheduler(space: Any, pins: dict[str, Any]) -> None:
    """What ASHA (``ASHAScheduler``) asserts of its settings, as one line naming them: the
    most epochs a trial runs (its ``max_t``) is at least ``search.grace_period`` (ASHA stops
    no trial before it); the other limits (grace_period >= 1, reduction_factor > 1, epochs >=
    1) are :data:`SEARCH_LIMITS` and the trial settings' own. ``pins``: the ``--set``
    settings, named by their flag."""
    grace, max_t = int(space.search["grace_period"]), space.max_epochs()
    if max_t >= grace or space.search.get("image_rungs"):  # rungs: ASHA's time is the rung
        return
    at = f"space {space.name}"
    if "epochs" in pins:
        who = f"--set epochs={pins['epochs']!r}"
    elif "epochs" in space.fixed:
        who = f"{at}: fixed.epochs={space.fixed['epochs']!r}"
    elif "epochs" in space.params:
        who = f"{at}: params.epochs (at most {max_t})"
    else:
        who = f"{at}: epochs (unset: the default {max_t})"
    raise SpaceError(f"{who} is below search.grace_period={grace} of space {space.name} (ASHA "
                     "stops no trial before its grace period, so every trial may run that many "
                     f"epochs); allowed: epochs >= {grace}, or a space file with "
                     f"search.grace_period <= {max_t}")


def check_label_fraction(name: str, value: Any) -> None:
    """A fraction in (0, 1] or the file listing the images to keep."""
    if isinstance(value, str) and not is_number(value):
        if not Path(value).is_file():
            raise SpaceError(f"space {name}: label_fraction file {value} does not exist; "
                             "allowed: a fraction in (0, 1] or a file listing the images")
        return
    try:
        check_setting("label_fraction", value)
    except UserError as exc:
        raise SpaceError(f"space {name}: {exc}") from None




def check_subset(spec: dict, where: str) -> None:
    members = spec["subset"]
    if not isinstance(members, list) or not members:
        raise SpaceError(f"{where}.subset is empty; give at least one value")
    if len(set(map(repr, members))) != len(members):
        raise SpaceError(f"{where}.subset {members} repeats a value; give each once")
    low = spec.setdefault("min", 1)
    if not _is_int(low) or not 1 <= low <= len(members):
        raise SpaceError(f"{where}.min={low!r} is invalid; allowed: an integer in "
                         f"1..{len(members)} (the subset's size)")
    spec["min"] = int(low)


def check_range(spec: dict, where: str) -> None:
    """A range ``{int|float: [low, high], step, log}``: numbers (made ints or floats), low <=
    high, a positive step (an integer for int), log only above 0 and without step."""
    kind = "int" if "int" in spec else "float"
    rng, what = spec[kind], "integers" if kind == "int" else "numbers"
    ok = _is_int if kind == "int" else _is_num
    if not (isinstance(rng, list) and len(rng) == 2 and all(ok(v) for v in rng)):
        raise SpaceError(f"{where}.{kind} must be [low, high], two {what}; got {rng!r}")
    rng = spec[kind] = [int(v) if kind == "int" else float(v) for v in rng]
    if rng[0] > rng[1]:
        raise SpaceError(f"{where}.{kind} must be [low, high] with low <= high; got {rng}")
    if "step" in spec:
        step = spec["step"]
        if not ok(step) or step <= 0:
            raise SpaceError(f"{where}.step={step!r} is invalid; allowed: "
                             f"{'an integer' if kind == 'int' else 'a number'} > 0")
        spec["step"] = int(step) if kind == "int" else float(step)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log={log!r} is invalid; allowed: true or false")
    if log and rng[0] <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0; got {rng}")
    if log and "step" in spec:
        raise SpaceError(f"{where}: step and log cannot be combined; drop one")


# ---- params: the structure of searched settings --------------------------------------------
def check_params(params: dict, where: str, *, in_head: bool = False) -> None:
    """The structure of a space's ``params`` (or a head's sub-space): trial settings only,
    each with exactly one of :data:`KINDS` and only its options."""
    if not isinstance(params, dict):
        raise SpaceError(f"{where} must be a mapping of setting: spec")
    for k, spec in params.items():
        if k not in TRIAL_KEYS:
            raise SpaceError(f"{where}.{k} is not a trial setting; allowed: {sorted(TRIAL_KEYS)}")
        if not isinstance(spec, dict) or len([x for x in KINDS if x in spec]) != 1:
            raise SpaceError(f"{where}.{k} must be a mapping with exactly one of {list(KINDS)} "
                             f"(e.g. {{choice: [1, 2, 4]}}); got {spec!r}")
        extra = set(spec) - set(KINDS) - {"step", "log", "min"}
        if extra:
            raise SpaceError(f"{where}.{k}: unknown option(s) {sorted(extra)}; "
                             "allowed: step, log, min")
        if "choice" in spec:
            choices = spec["choice"]
            if not choices:
                raise SpaceError(f"{where}.{k}.choice is empty; give at least one value")
            if isinstance(choices, dict):
                if k != "head" or in_head:
                    raise SpaceError(f"{where}.{k}: sub-spaces (a mapping of choices) are "
                                     "only allowed for head")
                bad = sorted(set(choices) - set(HEAD_TYPES))
                if bad:
                    raise SpaceError(f"{where}.head: unknown head type(s) {bad}; "
                                     f"allowed: {list(HEAD_TYPES)}")
                for h, sub in choices.items():
                    check_params(sub or {}, f"{where}.head.{h}", in_head=True)
            elif k == "head":
                bad = sorted(set(choices) - set(HEAD_TYPES))
                if bad:
                    raise SpaceError(f"{where}.head: unknown head type(s) {bad}; "
                                     f"allowed: {list(HEAD_TYPES)}")
        elif "subset" in spec:
            check_subset(spec, f"{where}.{k}")
        else:
            check_range(spec, f"{where}.{k}")
        if "min" in spec and "subset" not in spec:
            raise SpaceError(f"{where}.{k}: min is an option of subset only")
        if ("step" in spec or "log" in spec) and not ("int" in spec or "float" in spec):
            raise SpaceError(f"{where}.{k}: step and log are options of int and float ranges")


def values_of(spec: dict) -> list[Any]:
    """Every value (or range end) a spec can produce, for validation."""
    if "choice" in spec:
        vals = spec["choice"]
        return list(vals) if not isinstance(vals, dict) else list(vals)
    if "subset" in spec:
        return list(spec["subset"])
    return list(spec.get("int") or spec.get("float"))


def all_settings(space: Any) -> list[tuple[str, list[Any], str]]:
    """(setting, values it can take, where) over fixed, params and head sub-spaces."""
    out = [(k, [v], f"fixed.{k}") for k, v in space.fixed.items()]
    for k, spec in space.params.items():
        if k == "head" and isinstance(spec.get("choice"), dict):
            out.append(("head", list(spec["choice"]), "params.head"))
            for h, sub in spec["choice"].items():
                out += [(n, values_of(s), f"params.head.{h}.{n}") for n, s in (sub or {}).items()]
        else:
            out.append((k, values_of(spec), f"params.{k}"))
    return out
