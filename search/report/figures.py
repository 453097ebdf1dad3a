"""A search's figures, drawn from its trials (:class:`~.gather.SearchData`): each figure is a
matplotlib figure (the PNG to look at) and a plotly figure (the HTML to explore).

- ``block_timestep``: the best score per (block, timestep) cell, one panel per head type that
  reads one map (cells never tried are hatched, the champion is starred);
- ``slices``, ``importances``, ``history``: drawn by Optuna (:mod:`.optuna_figures`);
- ``cost``: score against the GFLOPs per image a trial reports, with the Pareto front: drawn
  by :mod:`.pareto_figure` (the one figure of a search's front, ``pareto`` when a
  multi-objective search's second objective is not ``gflops``);
- ``curves``: the learning curves of the top trials.

:func:`~.draw.draw_all` draws every figure the data allows.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from difftune.search.report.gather import SearchData, reads, trial_label
from difftune.trainables.heads import HEAD_TYPES
from difftune.trainables.model.unet import model_geometry

logger = logging.getLogger(__name__)

#: most timestep rows the block x timestep figure shows (more values are binned)
MAX_T_ROWS = 12
CHAMPION_STYLE = {"marker": "*", "s": 260, "color": "gold", "edgecolors": "black",
                  "linewidths": 0.8, "zorder": 7}


@dataclass
class Figure:
    """One figure: ``png`` a matplotlib Figure, ``html`` a plotly Figure."""

    name: str
    title: str
    png: Any
    html: Any


def subtitle(data: SearchData) -> str:
    """What the search was: model, data, run and how many trials are in."""
    n, done = len(data.trials), sum(t.finished for t in data.trials)
    where = ""
    if data.space is not None:
        where = (f"{os.path.basename(str(data.space.model))} U-Net on "
                 f"{os.path.basename(str(data.space.data).rstrip('/'))}, ")
    state = "" if data.parent_status == "FINISHED" else f" ({data.parent_status.lower()})"
    return f"{where}{data.parent_name or data.parent_run_id[:8]}{state}: {done} of {n} trials finished"


def short_score(v: float) -> str:
    """A score in a legend: ``94.4`` (a percent), ``0.213`` (a loss)."""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _cell(v: float) -> str:
    """A score in a heatmap's cell: ``94`` (a percent), ``0.21`` (a loss)."""
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}"


def mpl_figure(w: float, h: float, **kwargs: Any):
    import matplotlib.pyplot as plt  # matplotlib: only when a figure is drawn

    return plt.figure(figsize=(w, h), **kwargs)


# ---- block x timestep -----------------------------------------------------------------------
def _values(space, name: str) -> list[int]:
    """Every value an integer setting can take in the space (top level, head sub-spaces,
    fixed)."""
    specs = [space.params.get(name)]
    head = space.params.get("head", {})
    if isinstance(head.get("choice"), dict):
        specs += [(sub or {}).get(name) for sub in head["choice"].values()]
    out: set[int] = set()
    for spec in specs:
        if not spec:
            continue
        if "int" in spec:
            lo, hi = spec["int"]
            out.update(range(int(lo), int(hi) + 1, int(spec.get("step", 1))))
        elif "choice" in spec and not isinstance(spec["choice"], dict):
            out.update(int(v) for v in spec["choice"] if isinstance(v, (int, float)))
    if name in space.fixed and isinstance(space.fixed[name], int):
        out.add(space.fixed[name])
    return sorted(out)


def _t_rows(values: list[int]) -> list[tuple[int, int]]:
    """Timestep rows as inclusive (low, high) ranges: one per value, or bins of equal count
    when there are more than :data:`MAX_T_ROWS`."""
    if len(values) <= MAX_T_ROWS:
        return [(v, v) for v in values]
    per = math.ceil(len(values) / MAX_T_ROWS)
    rows = [(values[i], values[min(i + per, len(values)) - 1]) for i in range(0, len(values), per)]
    if len(values) % per and len(values) % per < per / 2:  # a short last bin joins the one before
        rows[-2:] = [(rows[-2][0], rows[-1][1])]
    return rows


def _row_label(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def grid_cells(data: SearchData) -> tuple[list[str], list[int], list[tuple[int, int]],
                                          dict[str, np.ndarray], dict[str, tuple[int, int]],
                                          dict[str, np.ndarray]]:
    """(heads, blocks, t rows, head -> best score grid [rows x blocks] (NaN = never tried),
    head -> the champion's (row, col), head -> the rung over images each cell's score was
    measured at [rows x blocks] (0 without rungs))."""
    single: dict[str, list] = {}
    for t in data.trials:
        if not t.finished:
            continue
        blocks, times = reads(t.config)
        if len(blocks) == 1 and len(times) == 1:
            single.setdefault(str(t.config.get("head")), []).append((blocks[0], times[0], t))
    heads = [h for h in HEAD_TYPES if h in single] + sorted(set(single) - set(HEAD_TYPES))
    seen_b = {b for rows in single.values() for b, _, _ in rows}
    seen_t = {x for rows in single.values() for _, x, _ in rows}
    blocks = sorted(set(_values(data.space, "block")) | seen_b) if data.space else sorted(seen_b)
    if blocks:
        blocks = list(range(blocks[0], blocks[-1] + 1))
    t_vals = sorted(set(_values(data.space, "t")) | seen_t) if data.space else sorted(seen_t)
    rows = _t_rows(t_vals)
    sign = 1.0 if data.mode == "max" else -1.0
    champ = data.champion
    grids, marks, rungs = {}, {}, {}
    for h in heads:
        g = np.full((len(rows), len(blocks)), np.nan)
        rung = np.full_like(g, np.nan)
        for b, x, t in single[h]:
            r = next(i for i, (lo, hi) in enumerate(rows) if lo <= x <= hi)
            c = blocks.index(b)
            # with rungs over images, a score on more images wins the cell
            if np.isnan(g[r, c]) or (t.rung, sign * t.score) > (rung[r, c], sign * g[r, c]):
                g[r, c], rung[r, c] = t.score, t.rung
            if champ is not None and t.run_id == champ.run_id:
                marks[h] = (r, c)
        grids[h], rungs[h] = g, rung
    return heads, blocks, rows, grids, marks, rungs


def _block_axis_label(data: SearchData) -> str:
    try:
        geo = model_geometry(data.space.model, data.space.checkpoint)
        return (f"U-Net block (encoder 1-{geo.middle - 1}, middle {geo.middle}, "
                f"decoder {geo.middle + 1}-{geo.num_blocks})")
    except Exception:  # a checkpoint that is not on this machine
        return "U-Net block"


def block_timestep(data: SearchData) -> Figure | None:
    """Best score per block x timestep cell, one panel per head type."""
    # matplotlib and plotly: only when a figure is drawn
    import matplotlib.patches as mpatches
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    heads, blocks, rows, grids, marks, cell_rungs = grid_cells(data)
    if not heads:
        return None
    rungs = len((data.space.search.get("image_rungs") or []) if data.space else [])
    label = data.metric_label
    better = "best" if data.mode == "max" else "lowest"
    title = f"{better.capitalize()} {label} per U-Net block and timestep"
    all_vals = np.concatenate([g[~np.isnan(g)] for g in grids.values()])
    vmin, vmax = float(all_vals.min()), float(all_vals.max())
    if vmin == vmax:
        vmin, vmax = vmin - 1, vmax + 1
    ncols = min(2, len(heads))
    nrows = math.ceil(len(heads) / ncols)
    panel_w = max(4.5, 0.27 * len(blocks) + 1.4)
    panel_h = max(3.0, 0.27 * len(rows) + 1.4)
    fig = mpl_figure(panel_w * ncols + 1.0, panel_h * nrows + 0.8, layout="constrained")
    gs = fig.add_gridspec(nrows, ncols)
    ylabels = [_row_label(r) for r in rows]
    xlabel = _block_axis_label(data)
    image = None
    annotate = len(blocks) * len(rows) <= 400
    for i, h in enumerate(heads):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        ax.add_patch(mpatches.Rectangle((-0.5, -0.5), len(blocks), len(rows), hatch="///",
                                        facecolor="#f2f2f2", edgecolor="#c8c8c8", lw=0,
                                        zorder=0))
        g = np.ma.masked_invalid(grids[h])
        image = ax.imshow(g, origin="lower", aspect="auto", cmap="viridis", vmin=vmin,
                          vmax=vmax, extent=(-0.5, len(blocks) - 0.5, -0.5, len(rows) - 0.5),
                          zorder=1)
        if annotate:
            for (r, c), v in np.ndenumerate(grids[h]):
                if not np.isnan(v):
                    frac = (v - vmin) / (vmax - vmin)
                    early = rungs and cell_rungs[h][r, c] < rungs - 1
                    text = f"{_cell(v)}\nr{int(cell_rungs[h][r, c]) + 1}" if early \
                        else _cell(v)
                    ax.text(c, r, text, ha="center", va="center", zorder=2,
                            fontsize=5.5 if early else 7, linespacing=0.9,
                            color="black" if frac > 0.55 else "white")
        if h in marks:
            r, c = marks[h]
            ax.add_patch(mpatches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=2.5,
                                            edgecolor="crimson", zorder=3, label="champion"))
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        n = int(np.sum(~np.isnan(grids[h])))
        ax.set_title(f"head: {h} ({n} cell{'' if n == 1 else 's'} tried)", fontsize=10)
        step = max(1, math.ceil(len(blocks) / 20))
        ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
        ax.set_yticks(range(len(rows)), ylabels, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("diffusion timestep t", fontsize=9)
    cbar = fig.colorbar(image, ax=fig.axes, shrink=0.9)
    cbar.set_label(f"{better} {label} in the cell")
    stopped = (f"\nrK: stopped at rung K of {rungs} over images (scored on a sample of them)"
               if rungs else "")
    fig.suptitle(f"{title}\n{subtitle(data)}; hatched = never tried{stopped}", fontsize=11)

    html = make_subplots(rows=nrows, cols=ncols, subplot_titles=[f"head: {h}" for h in heads],
                         horizontal_spacing=0.08, vertical_spacing=0.15)
    for i, h in enumerate(heads):
        r, c = i // ncols + 1, i % ncols + 1
        html.add_trace(go.Heatmap(
            z=grids[h], x=[str(b) for b in blocks], y=ylabels, coloraxis="coloraxis",
            hovertemplate="block %{x}<br>t %{y}<br>" + label + " %{z:.2f}<extra>" + h
            + "</extra>"), row=r, col=c)
        if h in marks:
            mr, mc = marks[h]
            html.add_trace(go.Scatter(x=[str(blocks[mc])], y=[ylabels[mr]], mode="markers",
                                      name="champion", marker={"symbol": "star", "size": 16,
                                                               "color": "white",
                                                               "line": {"width": 1}}),
                           row=r, col=c)
        html.update_xaxes(title_text="U-Net block", type="category", row=r, col=c)
        html.update_yaxes(title_text="timestep t", type="category", row=r, col=c)
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}; grey = never tried</sup>",
                       coloraxis={"colorscale": "Viridis", "cmin": vmin, "cmax": vmax,
                                  "colorbar": {"title": label}},
                       plot_bgcolor="#e5e5e5", height=380 * nrows + 120)
    return Figure("block_timestep", title, fig, html)


# ---- learning curves ------------------------------------------------------------------------
def curves(data: SearchData) -> Figure | None:
    """The metric per epoch of the top trials."""
    import plotly.graph_objects as go  # plotly: only when a figure is drawn

    top = [t for t in data.ranked() if data.histories.get(t.run_id)]
    if not top:
        return None
    label = data.metric_label
    title = f"Learning curves of the top {len(top)} trials"
    fig = mpl_figure(8.5, 5.0)
    ax = fig.add_subplot()
    html = go.Figure()
    for rank, t in enumerate(top, 1):
        steps, vals = zip(*sorted(data.histories[t.run_id]), strict=True)
        name = f"#{rank} {trial_label(t.config)}: {short_score(t.score)}"
        ax.plot(steps, vals, marker="o", ms=3, label=name)
        html.add_trace(go.Scatter(x=list(steps), y=list(vals), mode="lines+markers", name=name))
    rungs = data.space.search.get("image_rungs") if data.space else None
    ax.set_xlabel("epoch (the rungs over images one after another: each rung starts the "
                  "head afresh on more images)" if rungs else "epoch")
    per_rung = data.space.max_epochs() if rungs else 0
    for k in range(1, len(rungs or [])):
        ax.axvline(k * per_rung + 0.5, ls=":", color="grey", lw=1)
        ax.text(k * per_rung + 0.6, 0.02, f"rung {k + 1}", transform=ax.get_xaxis_transform(),
                fontsize=8, color="grey")
    ax.set_ylabel(label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{title}\n{subtitle(data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if data.mode == "max" else "upper right",
              title="rank, trial: final score",
              title_fontsize=8)
    fig.tight_layout()
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}</sup>", xaxis_title="epoch",
                       yaxis_title=label)
    return Figure("curves", title, fig, html)
