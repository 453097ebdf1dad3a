"""The one rule for "the best trial", used by the search summary, the champion, ``export``
and ``train``:

- eligible trials finished without error and reported a finite score;
- a trial's score is its metric at its last reported epoch (a trial ASHA stopped early is
  scored where it stopped);
- the best score wins (``mode`` max or min); ties go to the trial that ran fewer epochs,
  then to the earlier trial;
- with rungs over images, a trial scored at a later rung beats every trial stopped at an
  earlier one (their scores were measured on fewer images: a lucky 50-image val sample is
  no evidence against the full val split); the rule above ranks the trials of one rung.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftune.trainables.errors import UserError

MODES = ("max", "min")


@dataclass(frozen=True)
class Candidate:
    """One trial as the rule sees it.

    :param key: what the caller finds the trial by (a trial id, a run id).
    :param order: the trial's position in the search (earlier = smaller).
    :param score: its metric at its last reported epoch (None: never reported).
    :param epochs: epochs it ran.
    :param ok: it finished without error.
    :param rung: the rung over images it was scored at (0 without rungs).
    :param data: anything the caller wants back (its config, its run).
    """

    key: str
    order: float
    score: float | None
    epochs: int
    ok: bool = True
    data: Any = field(default=None, compare=False)
    rung: int = 0

    @property
    def eligible(self) -> bool:
        return self.ok and self.score is not None and math.isfinite(self.score)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is invalid; allowed: {list(MODES)}")
    return mode


def rank_trials(candidates: Iterable[Candidate], *, mode: str) -> list[Candidate]:
    """Eligible candidates, best first (see the module docstring)."""
    sign = -1.0 if check_mode(mode) == "max" else 1.0
    return sorted((c for c in candidates if c.eligible),
                  key=lambda c: (-c.rung, sign * c.score, c.epochs, c.order))


def best_trial(candidates: Sequence[Candidate], *, mode: str) -> Candidate | None:
    """The best candidate, or None when none is eligible."""
    ranked = rank_trials(candidates, mode=mode)
    return ranked[0] if ranked else None


def result_candidates(results, metric: str) -> list[Candidate]:
    """Every trial of a Ray Tune ``ResultGrid`` as a :class:`Candidate` (in trial order): ok
    when it ended without an error or a failure report (``failure``:
    :data:`difftune.trainables.trainable.FAILURE_KEY`)."""
    out = []
    for i, r in enumerate(results):
        metrics = r.metrics or {}
        score = metrics.get(metric)
        out.append(Candidate(
            key=str(metrics.get("trial_id", i)), order=i,
            score=float(score) if isinstance(score, (int, float)) else None,
            epochs=int(metrics.get("epoch", 0) or 0),
            ok=r.error is None and not metrics.get("failure"), data=r,
            rung=int(metrics.get("image_rung") or 0)))
    return out
