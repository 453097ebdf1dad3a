"""Every figure of a search, drawn from its :class:`~.gather.SearchData` (:func:`draw_all`) and
written into a folder or onto its parent run (:func:`write_figures`): ``figures/NAME.png`` to
look at, ``figures/NAME.html`` to explore.

A figure that cannot be drawn yet (too few trials) is left out; one that fails is logged and
left out, never the search.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from difftune.search.report import optuna_figures as fo
from difftune.search.report.figures import Figure, block_timestep, curves
from difftune.search.report.gather import FIGURES_DIR, SearchData
from difftune.search.report.pareto_figure import figure_of

logger = logging.getLogger(__name__)


def draw_all(data: SearchData) -> list[Figure]:
    """Every figure the data allows, in the order a reader wants them."""
    study = None
    try:
        study = fo.study_of(data)
    except Exception:
        logger.warning("the search's trials could not be turned into an Optuna study; "
                       "slices, importances and history left out", exc_info=True)
    makers: list[tuple[str, Callable[[], Figure | None]]] = [
        ("block_timestep", lambda: block_timestep(data)),
        ("slices", lambda: fo.slices(data, study) if study else None),
        ("importances", lambda: fo.importances(data, study) if study else None),
        ("history", lambda: fo.history(data, study) if study else None),
        ("cost", lambda: figure_of(data)),  # "pareto" when not against GFLOPs
        ("curves", lambda: curves(data)),
    ]
    out = []
    for name, make in makers:
        try:
            fig = make()
        except Exception:
            logger.warning("figure %s could not be drawn", name, exc_info=True)
            continue
        if fig is not None:
            out.append(fig)
    return out


def write_figures(data: SearchData, *, out_dir: str | os.PathLike | None = None,
                  client: MlflowClient | None = None) -> list[str]:
    """Draw every figure the data allows; write ``NAME.png`` + ``NAME.html`` into ``out_dir``
    and/or log them under ``figures/`` on the parent run. Returns the figure names."""
    import matplotlib.pyplot as plt  # matplotlib: only when figures are drawn

    names = []
    for fig in draw_all(data):
        names.append(fig.name)
        try:
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                fig.png.savefig(Path(out_dir) / f"{fig.name}.png", dpi=120)
                # plotly.js once beside the pages, so that they open without a network
                fig.html.write_html(Path(out_dir) / f"{fig.name}.html",
                                    include_plotlyjs="directory", full_html=True)
            if client is not None:
                client.log_figure(data.parent_run_id, fig.png,
                                  f"{FIGURES_DIR}/{fig.name}.png", save_kwargs={"dpi": 120})
                client.log_figure(data.parent_run_id, fig.html,
                                  f"{FIGURES_DIR}/{fig.name}.html")
        finally:
            plt.close(fig.png)
    return names
