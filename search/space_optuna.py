"""A space's parameters as Optuna distributions: the define-by-run function OptunaSearch
calls, and the inverse (a trial config -> its Optuna point, to enqueue the paper's config).
The parameter names come from :mod:`difftune.trainables.params`, the one place that spells
them; nothing is computed here.
"""

from __future__ import annotations

from typing import Any

from difftune.trainables.params import encode_choice, head_param, subset_param


def suggest(trial, params: dict[str, dict], const: dict[str, Any]) -> dict[str, Any]:
    """Suggest every parameter of ``params`` on an Optuna ``trial`` (define-by-run).

    :param const: the settings that are not searched; a head's constant settings (when one
        head type is offered) are added to it.
    :return: ``const``: what OptunaSearch adds to the suggested parameters.
    """
    for name, spec in params.items():
        _suggest(trial, name, spec, const)
    return const


def point(params: dict[str, dict], fixed: dict[str, Any], config: dict[str, Any]
          ) -> dict[str, Any] | None:
    """The Optuna parameter values of a trial ``config``, or None if it lies outside."""
    out: dict[str, Any] = {}
    for name, spec in params.items():
        if not _encode(name, spec, config, out):
            return None
    for k, v in fixed.items():
        if k in config and config[k] != v:
            return None
    return out


def _suggest(trial, name: str, spec: dict, const: dict, head: str | None = None) -> None:
    key = head_param(head, name) if head else name
    if "choice" in spec:
        choices = spec["choice"]
        if isinstance(choices, dict):  # conditional sub-spaces (head types)
            options = list(choices)
            value = options[0] if len(options) == 1 else trial.suggest_categorical(key, options)
            if len(options) == 1:
                const[key] = value
            for sub_name, sub_spec in (choices[value] or {}).items():
                _suggest(trial, sub_name, sub_spec, const, head=value)
            return
        trial.suggest_categorical(key, [encode_choice(c) for c in choices])
    elif "int" in spec:
        lo, hi = spec["int"]
        trial.suggest_int(key, lo, hi, step=spec.get("step", 1), log=spec.get("log", False))
    elif "float" in spec:
        lo, hi = spec["float"]
        trial.suggest_float(key, lo, hi, step=spec.get("step"), log=spec.get("log", False))
    elif "subset" in spec:
        members, least = spec["subset"], spec.get("min", 1)
        chosen = 0
        for i, m in enumerate(members):
            mkey = subset_param(key, m)
            if _forced(least - chosen, len(members) - i):
                const[mkey] = True
                chosen += 1
            elif trial.suggest_categorical(mkey, [True, False]):
                chosen += 1


def _forced(missing: int, left: int) -> bool:
    """A subset member is forced in (not suggested) when the members left, this one
    included, are just enough for the ``min`` still missing."""
    return missing >= left


def _encode(name: str, spec: dict, config: dict, out: dict, head: str | None = None) -> bool:
    key = head_param(head, name) if head else name
    if name not in config:
        return False
    v = config[name]
    if "choice" in spec:
        choices = spec["choice"]
        if isinstance(choices, dict):
            if v not in choices:
                return False
            if len(choices) > 1:
                out[key] = v
            return all(_encode(n, s, config, out, head=v)
                       for n, s in (choices[v] or {}).items())
        if encode_choice(v) not in [encode_choice(c) for c in choices]:
            return False
        out[key] = encode_choice(v)
    elif "int" in spec or "float" in spec:
        lo, hi = spec.get("int") or spec.get("float")
        if not lo <= v <= hi:
            return False
        step = spec.get("step")
        if step and abs((v - lo) / step - round((v - lo) / step)) > 1e-9:
            return False
        out[key] = v
    elif "subset" in spec:
        members, least = spec["subset"], spec.get("min", 1)
        if len(v) < least or not set(v) <= set(members):
            return False
        chosen = 0
        for i, m in enumerate(members):  # the define-by-run's walk, replayed
            if _forced(least - chosen, len(members) - i):
                if m not in v:
                    return False
            else:
                out[subset_param(key, m)] = m in v
            chosen += m in v
    return True
