"""The flat parameter names of a trial, both ways: the one place that knows how a trial's
settings are spelled as Optuna parameters (and so in Ray Tune's trial configs).

Ray Tune hands a trial a flat dict; Optuna needs one name per distribution. A trial setting
becomes:

- ``NAME`` for a plain setting (``block``, ``lr``); list values of a ``choice`` are JSON
  strings (``"[256, 256]"``), since Optuna's categorical choices must be scalars;
- ``HEAD:NAME`` for a setting of a head's own sub-space (``mlp:hidden``): suggested only when
  that head is chosen, so each head type keeps its own distribution;
- ``NAME@VALUE`` booleans for the members of a subset (``blocks@19``): Ray Tune splits names
  on ``/``, so that is avoided.

:func:`decode` turns such a dict back into settings and :func:`trial_config` into a
:class:`~difftune.trainables.config.TrialConfig`; code past the trainable's entry sees only
``TrialConfig``.
"""

from __future__ import annotations

import json
from typing import Any

from difftune.trainables.config import TrialConfig

HEAD_SEP = ":"
SUBSET_SEP = "@"


def head_param(head: str, name: str) -> str:
    """The parameter name of setting ``name`` in head ``head``'s sub-space."""
    return f"{head}{HEAD_SEP}{name}"


def subset_param(name: str, member: Any) -> str:
    """The boolean parameter saying whether ``member`` is in the subset ``name``."""
    return f"{name}{SUBSET_SEP}{member}"


def encode_choice(value: Any) -> Any:
    """A choice value as Optuna stores it (lists and tuples as JSON strings)."""
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


def decode(raw: dict[str, Any]) -> dict[str, Any]:
    """Flat parameter names -> trial settings.

    ``HEAD:NAME`` -> ``NAME`` (a head's own sub-space wins over a top-level setting of the
    same name); ``NAME@VALUE`` booleans -> ``NAME: [VALUE, ...]``; JSON list strings -> lists.
    """
    out: dict[str, Any] = {}
    subsets: dict[str, list[int]] = {}
    for key, value in sorted(raw.items(), key=lambda kv: HEAD_SEP in kv[0]):
        name = key.split(HEAD_SEP, 1)[-1]
        if SUBSET_SEP in name:
            base, member = name.split(SUBSET_SEP, 1)
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


def trial_config(raw: dict[str, Any]) -> TrialConfig:
    """A trial's flat config (as Ray Tune holds it) -> :class:`TrialConfig`."""
    return TrialConfig.from_dict(decode(raw))
