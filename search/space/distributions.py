"""A space's parameters as Optuna distributions: the define-by-run function OptunaSearch
calls, and the inverse (a trial config -> its Optuna point, to enqueue the paper's config).
The parameter names come from :mod:`difftune.trainables.params`, the one place that spells
them; nothing is computed here.

The head is suggested first, and a top-level setting that some head kind reads (``block``,
``t``, ``pool``, ``pre_pool``, ... :attr:`~difftune.trainables.heads.HeadKind.settings`) is
suggested only when the chosen head reads it: a DifFormer trial has no ``block``, ``t`` or
``pool`` dimension, a linear one no ``pre_pool``, so TPE never models dimensions that cannot
change the result.
"""

from __future__ import annotations

from typing import Any

from difftune.trainables.heads import KINDS
from difftune.trainables.params import encode_choice, head_param, subset_param

#: settings read by some head kind but not by every one
HEAD_SETTINGS = frozenset(s for k in KINDS.values() for s in k.settings)
DEFAULT_HEAD = "linear"


def reads(head: str, name: str) -> bool:
    """Whether a trial of head ``head`` reads the top-level setting ``name``."""
    kind = KINDS.get(head)
    return name not in HEAD_SETTINGS or kind is None or name in kind.settings


def _ordered(params: dict[str, dict]) -> list[str]:
    return (["head"] if "head" in params else []) + [n for n in params if n != "head"]


def suggest(trial, params: dict[str, dict], const: dict[str, Any]) -> dict[str, Any]:
    """Suggest the parameters of ``params`` on an Optuna ``trial`` (define-by-run): the head
    first, then the settings that head reads.

    :param const: the settings that are not searched; a head's constant settings (when one
        head type is offered) are added to it.
    :return: ``const``: what OptunaSearch adds to the suggested parameters.
    """
    for name in _ordered(params):
        head = _chosen_head(trial, const)
        if name == "head" or reads(head, name):
            _suggest(trial, name, params[name], const)
    return const


def _chosen_head(trial, const: dict[str, Any]) -> str:
    return str(trial.params.get("head", const.get("head", DEFAULT_HEAD)))


def point(params: dict[str, dict], fixed: dict[str, Any], config: dict[str, Any]
          ) -> dict[str, Any] | None:
    """The Optuna parameter values of a trial ``config``, or None if it lies outside."""
    out: dict[str, Any] = {}
    head = str(config.get("head", fixed.get("head", DEFAULT_HEAD)))
    for name in _ordered(params):
        if name != "head" and not reads(head, name):
            continue
        if not _encode(name, params[name], config, out):
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


# ---- startup trials, and the paper's prior for them ----------------------------------------
def startup_trials(trials: int) -> int:
    """Trials TPE leaves to its startup design before it models the results: a tenth of the
    budget, between 2 and 10 (fewer than Optuna's default 10; the candidates' val regret on
    tuning seeds: the ``optuna_vs_random_tune`` row of benchmarks/RESULTS.md)."""
    return min(10, max(2, int(trials) // 10))


#: where the paper found frozen diffusion features classify best: blocks near the middle of
#: the U-Net (within this share of its depth on either side) and timesteps 50..300
PRIOR_BLOCK_SPAN = 1 / 6
PRIOR_T = (50, 300)


def _values_in(spec: dict | None, lo: float, hi: float) -> list[int]:
    """The values of an int or choice spec that lie in [lo, hi]."""
    if not spec:
        return []
    if "int" in spec:
        a, b = spec["int"]
        step = spec.get("step", 1)
        values = list(range(a, b + 1, step))
    elif "choice" in spec and not isinstance(spec["choice"], dict):
        values = [v for v in spec["choice"] if isinstance(v, int) and not isinstance(v, bool)]
    else:
        return []
    return [v for v in values if lo <= v <= hi]


def prior_points(params: dict[str, dict], *, num_blocks: int, middle: int, n: int,
                 seed: int) -> list[dict[str, Any]]:
    """``n`` startup points drawn from the paper's prior (:data:`PRIOR_BLOCK_SPAN`,
    :data:`PRIOR_T`), seeded: partial points (``block`` and ``t`` only, where the space
    searches them) that Optuna enqueues; everything else is sampled as usual. A space opts in
    with ``search: {prior: paper}``: it holds for the paper's ImageNet model, not for the demo
    (on 16-pixel digits t <= 50 is best, and the prior raised TPE's regret on the demo grid)."""
    import random

    span = max(1, round(PRIOR_BLOCK_SPAN * num_blocks))
    options = {"block": _values_in(params.get("block"), middle - span, middle + span),
               "t": _values_in(params.get("t"), *PRIOR_T)}
    options = {k: v for k, v in options.items() if v}
    if not options or n <= 0:
        return []
    rng = random.Random(seed)
    columns = {}
    for name, values in options.items():  # each value once before any repeats (stratified)
        col: list[int] = []
        while len(col) < n:
            col += rng.sample(values, len(values))
        columns[name] = col[:n]
    return [{name: columns[name][i] for name in columns} for i in range(n)]
