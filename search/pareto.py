"""The Pareto front of a multi-objective search (``search.objectives``, e.g. val top-1 against
GFLOPs per image): the trials no other trial beats on every objective at once.

Trials are scored as :mod:`.best` scores them (finished without error, each objective at the
last epoch the trial reported, finite); a trial dominates another when it is at least as good
on every objective and better on one. The parent run records the front as a table artifact
``pareto.json`` and a figure ``pareto.png``; ``difftune export --pareto`` writes its configs.
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
FIGURE = "pareto.png"
#: settings shown beside the objectives in the table (where the trial's head reads them)
SHOWN = ("head", "block", "t", "pool", "blocks", "timesteps", "lr", "hidden", "dim")
#: axis titles of the metrics
NAMES = {"val_top1": "val top-1 (%)", "val_top5": "val top-5 (%)", "val_loss": "val loss",
         "train_loss": "train loss", "gflops": "GFLOPs per image"}


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


def figure(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
           objectives: Sequence[dict[str, str]]):
    """A matplotlib figure: every trial by its first two objectives (the second on x), the
    front drawn as a line through its points, each front point labelled with its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_obj, x_obj = objectives[0], objectives[1]
    y, x = y_obj["metric"], x_obj["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    pts = [(r[x], r[y]) for r in rows if _num(r.get(x)) is not None and _num(r.get(y)) is not None]
    if pts:
        ax.scatter(*zip(*pts, strict=True), s=22, color="#9aa5b1", label="trial", zorder=2)
    fx = [r[x] for r in front]
    fy = [r[y] for r in front]
    order = sorted(range(len(front)), key=lambda i: fx[i])
    ax.plot([fx[i] for i in order], [fy[i] for i in order], "-o", color="#d1495b", ms=6,
            # the edge of what the front dominates
            drawstyle="steps-post" if x_obj["mode"] == "min" else "steps-pre",
            label="Pareto front", zorder=3)
    labelled: set[tuple] = set()
    for j, i in enumerate(order):  # alternate above and below: neighbours do not overlap
        r = front[i]
        text = short(r.get("config", {}))
        if (r[x], r[y], text) in labelled:
            continue
        labelled.add((r[x], r[y], text))
        ax.annotate(text, (r[x], r[y]), textcoords="offset points", fontsize=7,
                    xytext=(6, 6) if j % 2 == 0 else (6, -12), color="#333333")
    ax.set_xlabel(f"{NAMES.get(x, x)} ({'lower' if x_obj['mode'] == 'min' else 'higher'} "
                  "is better)")
    ax.set_ylabel(f"{NAMES.get(y, y)} ({'higher' if y_obj['mode'] == 'max' else 'lower'} "
                  "is better)")
    if x == "gflops" and pts and min(p[0] for p in pts) > 0:
        ax.set_xscale("log")
    more = f" (first 2 of {len(objectives)} objectives)" if len(objectives) > 2 else ""
    ax.set_title(f"Pareto front: {len(front)} of {len(rows)} trials{more}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


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
    """Compute the front of ``rows`` and record it on the run ``run_id`` (``pareto.json``,
    ``pareto.png``); returns the front, best first."""
    front = front_rows(rows, objectives)
    client.log_table(run_id, table(front, objectives), TABLE)
    if len(objectives) >= 2 and front:
        import matplotlib.pyplot as plt

        fig = figure(rows, front, objectives)
        client.log_figure(run_id, fig, FIGURE)
        plt.close(fig)
    logger.info("Pareto front: %d of %d trials", len(front), len(rows))
    return front
