"""The one figure of a search's Pareto front (:func:`figure_of`, logged with the search's
other figures as ``figures/cost.png`` and ``.html``, and drawn by ``difftune report``): every
finished trial by its score and its GFLOPs per image (a multi-objective search: its first two
objectives), one colour per head, the front (:mod:`difftune.search.records.pareto`) drawn
through its trials and labelled, the champion starred. A single-objective search's front is
of its score and GFLOPs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difftune.search.records.pareto import front_name, pareto_front
from difftune.search.report.figures import CHAMPION_STYLE, Figure, mpl_figure, subtitle
from difftune.search.report.gather import SearchData, blocks_read, reads, trial_label
from difftune.trainables.model.cost import gflops_to, model_costs

logger = logging.getLogger(__name__)

#: front trials named in the figure's legend (best score first)
MAX_NAMED = 10
#: axis titles of the metrics
NAMES = {"val_top1": "val top-1 (%)", "val_top5": "val top-5 (%)", "val_loss": "val loss",
         "train_loss": "train loss", "gflops": "GFLOPs per image"}


@dataclass
class Front:
    """Finished trials placed by the score (y) and a second objective (x), and which of them
    are on the Pareto front (:func:`~difftune.search.records.pareto.pareto_front`: of the search's
    objectives; of the score and GFLOPs for a single-objective search)."""

    objectives: list[dict[str, str]]
    points: list[tuple[float, float, Any]]  # (x, y, TrialRow)
    front: list[int]  # indices into points, best first by the score

    @property
    def x_metric(self) -> str:
        return self.objectives[1]["metric"]


def front_of(data: SearchData) -> Front | None:
    """The trials of the front figure, None when no finished trial has the x value."""
    objectives = data.objectives()
    if len(objectives) < 2:
        objectives = [*objectives, {"metric": "gflops", "mode": "min"}]
    x_metric = objectives[1]["metric"]
    fallback = _unet_gflops(data) if x_metric == "gflops" else None
    points, values = [], []
    for t in data.trials:
        if not t.finished:
            continue
        x = t.metrics.get(x_metric)
        if x is None and fallback is not None:
            x = fallback(t.config)
        rest = [t.metrics.get(o["metric"]) for o in objectives[2:]]
        if x is None or not math.isfinite(float(x)):
            continue
        points.append((float(x), float(t.score), t))
        values.append([float(t.score), float(x), *rest])
    if not points:
        return None
    return Front(objectives, points, pareto_front(values, [o["mode"] for o in objectives]))


def _unet_gflops(data: SearchData) -> Callable[[dict], float | None] | None:
    """For runs that did not report ``gflops`` (searches before it was reported): the U-Net
    passes a trial's features need (one per timestep, up to its deepest block), counted here."""
    if data.space is None:
        return None
    try:
        costs = model_costs(data.space.model, data.space.checkpoint)
    except Exception as exc:  # the model's flags are not readable here
        logger.info("GFLOPs of old trials left out: %s", str(exc).splitlines()[0])
        return None

    def count(config: dict) -> float | None:
        blocks = blocks_read(config)
        if not blocks or max(blocks) not in costs:
            return None
        return len(reads(config)[1] or [0]) * gflops_to(costs, blocks)
    return count


def figure_of(data: SearchData) -> Figure | None:
    """The score against GFLOPs per image (or the search's second objective), one colour per
    head, the Pareto front drawn through its trials and labelled, the champion starred."""
    import plotly.graph_objects as go  # plotly: only when a figure is drawn

    f = front_of(data)
    if f is None:
        return None
    label = data.metric_label
    xm = f.x_metric
    x_mode = f.objectives[1]["mode"]
    xlabel = (f"GFLOPs per image: the U-Net passes a trial's features need, plus its head "
              f"({'lower' if x_mode == 'min' else 'higher'} is better)") if xm == "gflops" \
        else f"{NAMES.get(xm, xm)} ({'lower' if x_mode == 'min' else 'higher'} is better)"
    more = f", first 2 of {len(f.objectives)} objectives" if len(f.objectives) > 2 else ""
    what = "GFLOPs per image" if xm == "gflops" else NAMES.get(xm, xm)
    title = (f"{label[0].upper()}{label[1:]} against {what}: "
             f"the Pareto front ({len(f.front)} of {len(f.points)} trials{more})")
    by_head: dict[str, list[tuple[float, float, Any]]] = {}
    for p in f.points:
        by_head.setdefault(str(p[2].config.get("head")), []).append(p)
    on = sorted((f.points[i] for i in f.front), key=lambda p: p[0])
    # the edge of what the front dominates (a staircase when it is of these two objectives)
    step = "post" if x_mode == "min" else "pre"
    fig = mpl_figure(9.5, 5.2)
    ax = fig.add_subplot()
    for h, ps in by_head.items():
        ax.scatter([p[0] for p in ps], [p[1] for p in ps], label=h, alpha=0.8, s=30, zorder=2)
    if len(f.objectives) == 2:
        ax.step([p[0] for p in on], [p[1] for p in on], where=step, color="black", lw=1.2,
                label="Pareto front", zorder=3)
    ax.scatter([p[0] for p in on], [p[1] for p in on], s=70, facecolors="none",
               edgecolors="black", lw=1.2, zorder=4,
               label=None if len(f.objectives) == 2 else "on the Pareto front")
    # the front's trials numbered beside their points (best score first), named in the legend:
    # names written on the plot cover each other and the points around them
    numbered = [f.points[i] for i in f.front][:MAX_NAMED]
    for n, (x, y, _t) in enumerate(numbered, 1):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(-6, 5), ha="right",
                    fontsize=8, fontweight="bold", color="#222222", zorder=6)
    champ = data.champion
    cc = [p for p in f.points if champ is not None and p[2].run_id == champ.run_id]
    if cc:
        ax.scatter([cc[0][0]], [cc[0][1]], **CHAMPION_STYLE, label="champion")
    xs = [p[0] for p in f.points]
    log_x = min(xs) > 0 and max(xs) / min(xs) > 20
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(f"{label} ({'higher' if data.mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{title}\n{subtitle(data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D  # matplotlib: only when a figure is drawn

    more = len(f.front) - len(numbered)
    handles.append(Line2D([], [], ls="none"))
    labels.append(f"on the front ({'score, ' + what if xm == 'gflops' else 'y, x'})"
                  + (f"; {more} more" if more > 0 else "") + ":")
    for n, (x, y, t) in enumerate(numbered, 1):
        handles.append(Line2D([], [], ls="none", marker=f"${n}$", color="#222222", ms=7))
        labels.append(f"{trial_label(t.config)} ({y:.4g}, {x:.3g})")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="head", title_fontsize=8)
    fig.tight_layout()

    html = go.Figure()
    for h, ps in by_head.items():
        html.add_trace(go.Scatter(x=[p[0] for p in ps], y=[p[1] for p in ps], mode="markers",
                                  name=h, text=[trial_label(p[2].config) for p in ps],
                                  hovertemplate="%{text}<br>%{x:.4g} " + what + "<br>%{y:.2f}"))
    html.add_trace(go.Scatter(
        x=[p[0] for p in on], y=[p[1] for p in on], name="Pareto front",
        mode="lines+markers" if len(f.objectives) == 2 else "markers",
        line={"shape": "hv" if step == "post" else "vh", "color": "black"},
        marker={"symbol": "circle-open", "size": 12, "color": "black"}))
    if cc:
        html.add_trace(go.Scatter(x=[cc[0][0]], y=[cc[0][1]], mode="markers", name="champion",
                                  marker={"symbol": "star", "size": 18, "color": "gold",
                                          "line": {"width": 1, "color": "black"}}))
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}</sup>", xaxis_title=xlabel,
                       yaxis_title=label, legend_title_text="head")
    if log_x:
        html.update_xaxes(type="log")
    return Figure(front_name([o["metric"] for o in f.objectives]), title, fig, html)
