"""The Pareto front of a multi-objective search (``search.objectives``, e.g. val top-1 against
GFLOPs per image): the trials no other trial beats on every objective at once.

Trials are scored as :mod:`.best` scores them (finished without error, each objective at the
last epoch the trial reported, finite); a trial dominates another when it is at least as good
on every objective and better on one. The parent run records the front as a table artifact
``pareto.json``; ``difftune export --pareto`` writes its configs. The front's figure is drawn
by :mod:`difftune.search.report.pareto_figure`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from difftune.trainables.heads import KINDS

logger = logging.getLogger(__name__)

TABLE = "pareto.json"
#: settings shown beside the objectives in the table (where the trial's head reads them)
SHOWN = ("head", "block", "t", "pool", "blocks", "timesteps", "lr", "hidden", "dim")


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether objective values ``a`` dominate ``b``: no worse on every objective, better on
    at least one (``modes``: ``max`` or ``min`` per objective)."""
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(values: Sequence[Sequence[float | None]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated rows of ``values`` among those with every objective
    finite, ordered best first by the first objective (ties: the earlier row)."""
    ok = [i for i, v in enumerate(values)
          if all(x is not None and math.isfinite(x) for x in v)]
    front = [i for i in ok if not any(dominates(values[j], values[i], modes) for j in ok)]
    sign = -1.0 if modes[0] == "max" else 1.0
    return sorted(front, key=lambda i: (sign * values[i][0], i))


def front_rows(rows: Sequence[dict[str, Any]], objectives: Sequence[dict[str, str]]
               ) -> list[dict[str, Any]]:
    """The rows (one per eligible trial, holding each objective's value) on the front, best
    first by the first objective."""
    metrics = [o["metric"] for o in objectives]
    modes = [o["mode"] for o in objectives]
    values = [[_num(r.get(m)) for m in metrics] for r in rows]
    return [rows[i] for i in pareto_front(values, modes)]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def table(front: Sequence[dict[str, Any]], objectives: Sequence[dict[str, str]]
          ) -> dict[str, list]:
    """The front as columns (``mlflow.log_table``'s format): rank, run id, the objectives,
    the shown settings; list values as JSON text."""
    metrics = [o["metric"] for o in objectives]
    read = [_read(r.get("config", {})) for r in front]
    cols = ["rank", "run_id", "trial_id", *metrics]
    cols += [k for k in SHOWN if any(k in names for names in read)]
    out: dict[str, list] = {c: [] for c in cols}
    for rank, (r, names) in enumerate(zip(front, read, strict=True), 1):
        cfg = r.get("config", {})
        for c in cols:
            if c == "rank":
                v = rank
            elif c in ("run_id", "trial_id", *metrics):
                v = r.get(c)
            else:
                v = cfg.get(c) if c in names else None
            out[c].append(json.dumps(v) if isinstance(v, (list, dict)) else v)
    return out


def _read(cfg: dict[str, Any]) -> set[str]:
    """The settings a trial's head reads (its kind's) plus ``head`` and ``lr``."""
    kind = KINDS.get(cfg.get("head", ""))
    return {"head", "lr", *(kind.settings if kind else ())} & set(cfg)


def front_name(metrics: list[str]) -> str:
    """The name of the figure of a search's Pareto front: ``cost`` (the score against GFLOPs
    per image: every single-objective search, and a multi-objective one whose second
    objective is ``gflops``), else ``pareto``."""
    return "cost" if len(metrics) < 2 or metrics[1] == "gflops" else "pareto"


def short(cfg: dict[str, Any]) -> str:
    """``linear b10 t90 p2``: a trial's feature setting in a few characters."""
    head = cfg.get("head", "")
    if head == "difformer":
        return f"{head} b{cfg.get('blocks')} t{cfg.get('timesteps')}".replace(" ", "")
    parts = [head, f"b{cfg.get('block')}", f"t{cfg.get('t')}"]
    if head in ("linear", "mlp"):
        parts.append(f"p{cfg.get('pool')}")
    return " ".join(parts)


def log_front(client, run_id: str, rows: Sequence[dict[str, Any]],
              objectives: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Compute the front of ``rows`` and record it on the run ``run_id`` (``pareto.json``;
    its figure is drawn with the search's others); returns the front, best first."""
    front = front_rows(rows, objectives)
    client.log_table(run_id, table(front, objectives), TABLE)
    logger.info("Pareto front: %d of %d trials", len(front), len(rows))
    return front
