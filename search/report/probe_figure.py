"""The probe rung's map (:mod:`difftune.search.run.probe`) seen: a block x timestep heatmap of
the ridge probe's val top-1 (:func:`draw_probe_map`, ``figures/probe_map.png`` on the parent
run), the map read back from the parent run (:func:`read_probe_map`), and the short summary
the parent run's tag and description carry (:func:`summary_tag`, :func:`probe_line`).

The map is a plain dict (``probe_map.json``): ``cells`` [{block, t, pool, val_top1, val_mse,
lambda, dim, probe_dim}], ``fraction``, ``train_rows``, ``val_rows``, ``classes``, ``unet_images``,
``seconds``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: the map on the parent run
MAP_ARTIFACT = "probe_map.json"
#: the figure on the parent run
FIGURE_ARTIFACT = "figures/probe_map.png"
#: the parent run's metric: U-Net image-passes the probe rung spent
METRIC = "probe_unet_images"
#: the parent run's tag: the map's summary (JSON, :func:`summary_tag`)
TAG = "difftune.probe"
#: best cells the summary names
BEST = 3


def grid_of(pmap: dict[str, Any]) -> tuple[list[int], list[int], np.ndarray]:
    """``(blocks, timesteps, [T x B] val top-1)`` of the map (NaN where a cell is missing)."""
    blocks = sorted({int(c["block"]) for c in pmap["cells"]})
    times = sorted({int(c["t"]) for c in pmap["cells"]})
    grid = np.full((len(times), len(blocks)), np.nan)
    bi, ti = {b: i for i, b in enumerate(blocks)}, {t: i for i, t in enumerate(times)}
    for c in pmap["cells"]:
        grid[ti[int(c["t"])], bi[int(c["block"])]] = float(c["val_top1"])
    return blocks, times, grid


def rank_key(cell: dict[str, Any]) -> tuple:
    """The one order of a map's cells, best first: val top-1, then (its ties: on a small
    sample many) the lower val squared error, then the earlier block and the smaller t."""
    return (-float(cell["val_top1"]), float(cell.get("val_mse", 0.0)), cell["block"],
            cell["t"])


def best_cells(pmap: dict[str, Any], n: int | None = BEST) -> list[dict[str, Any]]:
    """The ``n`` best cells (:func:`rank_key`; None: all of them, ranked)."""
    ranked = sorted(pmap["cells"], key=rank_key)
    return ranked if n is None else ranked[:n]


def draw_probe_map(pmap: dict[str, Any]):
    """The map as a matplotlib Figure: blocks across, timesteps up, val top-1 in colour, the
    best cell outlined; the caller saves and closes it."""
    import matplotlib.patches as mpatches  # matplotlib: only when a figure is drawn
    import matplotlib.pyplot as plt

    blocks, times, grid = grid_of(pmap)
    fig = plt.figure(figsize=(max(7.0, 0.32 * len(blocks) + 2.6),
                              max(3.6, 0.16 * len(times) + 1.9)), layout="constrained")
    ax = fig.add_subplot()
    vmin, vmax = float(np.nanmin(grid)), float(np.nanmax(grid))
    if vmin == vmax:
        vmin, vmax = vmin - 1, vmax + 1
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto",
                      cmap="viridis", vmin=vmin, vmax=vmax,
                      extent=(-0.5, len(blocks) - 0.5, -0.5, len(times) - 0.5))
    if len(blocks) * len(times) <= 300:
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                dark = (v - vmin) / (vmax - vmin) < 0.55
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    best = best_cells(pmap, 1)[0]
    r, c = times.index(int(best["t"])), blocks.index(int(best["block"]))
    ties = sum(float(x["val_top1"]) == float(best["val_top1"]) for x in pmap["cells"]) - 1
    tied = f"; ahead of {ties} other cell{'s' if ties > 1 else ''} at {best['val_top1']:.1f}% " \
        "by val squared error" if ties else ""
    ax.add_patch(mpatches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=2.5,
                                    edgecolor="crimson",
                                    label=f"best: block {best['block']}, t={best['t']} "
                                          f"({best['val_top1']:.1f}%{tied})"))
    fig.legend(loc="outside lower center", fontsize=9, frameon=False)
    xstep = max(1, math.ceil(len(blocks) / 25))
    ystep = max(1, math.ceil(len(times) / 30))
    ax.set_xticks(range(0, len(blocks), xstep), [str(b) for b in blocks[::xstep]], fontsize=8)
    ax.set_yticks(range(0, len(times), ystep), [str(t) for t in times[::ystep]], fontsize=8)
    ax.set_xlabel("U-Net block", fontsize=9)
    ax.set_ylabel("diffusion timestep t", fontsize=9)
    cbar = fig.colorbar(image, ax=ax, shrink=0.9)
    cbar.set_label("ridge probe val top-1 (%)", fontsize=9)
    pool = {int(c["pool"]) for c in pmap["cells"]}
    ax.set_title(f"Probe rung: every block x timestep on {pmap['train_rows']:,} train / "
                 f"{pmap['val_rows']:,} val images\n(fraction {pmap['fraction']:g}, pool "
                 f"{'/'.join(map(str, sorted(pool)))}, closed-form ridge; "
                 f"{int(pmap['unet_images']):,} U-Net image-passes)", fontsize=10)
    return fig


def summary_tag(pmap: dict[str, Any]) -> dict[str, Any]:
    """What the parent run's tag :data:`TAG` holds: the sample, the cost, the best cells."""
    return {"cells": len(pmap["cells"]), "fraction": pmap["fraction"],
            "train_rows": pmap["train_rows"], "val_rows": pmap["val_rows"],
            "unet_images": pmap["unet_images"], "seconds": pmap.get("seconds"),
            "best": [[c["block"], c["t"], round(float(c["val_top1"]), 2)]
                     for c in best_cells(pmap)]}


def probe_line(tag: str | None, run_id: str | None = None) -> str | None:
    """The description's line for a parent run's :data:`TAG` (None without one), with links
    to the figure and the map when ``run_id`` (the parent run's) is given."""
    if not tag:
        return None
    try:
        s = json.loads(tag)
        best = "; ".join(f"block {b}, t={t}: {v:.1f}%" for b, t, v in s["best"])
        line = (f"**Probe rung** ({s['cells']} block x timestep cells, a ridge probe on "
                f"{s['train_rows']:,} train / {s['val_rows']:,} val images, "
                f"{int(s['unet_images']):,} U-Net image-passes): val top-1 best at {best}")
    except (ValueError, KeyError, TypeError):
        return None
    if run_id is None:
        return f"{line} (`{FIGURE_ARTIFACT}`, `{MAP_ARTIFACT}`)."
    links = ", ".join(f"[{what}](get-artifact?path={path.replace('/', '%2F')}"
                      f"&run_uuid={run_id})"
                      for what, path in (("map", FIGURE_ARTIFACT), ("json", MAP_ARTIFACT)))
    return f"{line} ({links})."


def read_probe_map(client: Any, run_id: str) -> dict[str, Any] | None:
    """The map on a parent run (:data:`MAP_ARTIFACT`), or None."""
    if MAP_ARTIFACT not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            pmap = json.loads(Path(client.download_artifacts(run_id, MAP_ARTIFACT, d))
                              .read_text())
        except (OSError, ValueError):
            logger.warning("%s of run %s is unreadable", MAP_ARTIFACT, run_id)
            return None
    return pmap if isinstance(pmap, dict) and pmap.get("cells") else None
