"""The figures Optuna draws: slice plots (pooling, learning rate), fANOVA parameter
importances and the optimization history, each as a matplotlib figure (the PNG) and a plotly
figure (the HTML), from a study rebuilt out of a search's MLflow runs (:func:`study_of`), so
that they can be drawn for any search, with or without the study's own storage at hand.

A trial's parameters are the space's Optuna parameters (:mod:`difftune.search.space.distributions`), except the
settings its head does not read (an attention head's ``pool``, a DifFormer's ``block``): a
slice plot or an importance must not credit a setting that changed nothing.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from difftune.search.report.figures import Figure, short_score, subtitle
from difftune.search.report.gather import SearchData, TrialRow
from difftune.trainables.heads import KINDS

logger = logging.getLogger(__name__)

#: parameters the slice figure shows, when the space searches them
SLICE_PARAMS = ("pool", "lr")
#: fANOVA needs a few trials to say anything; below FEW its numbers are flagged as rough
MIN_IMPORTANCE_TRIALS = 3
FEW = 10
PARAM_LABELS = {"lr": "learning rate", "t": "timestep t", "block": "U-Net block",
                "pool": "pool size (p x p)", "head": "head type"}


@contextmanager
def _quiet(figsize: tuple[float, float] | None = None) -> Iterator[None]:
    """Optuna without its experimental warnings and INFO lines; matplotlib figures it makes
    of ``figsize`` inches."""
    import matplotlib  # matplotlib: only when a figure is drawn

    rc = {"figure.figsize": figsize} if figsize else {}
    with warnings.catch_warnings(), matplotlib.rc_context(rc):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(verbosity)


def _head_only_settings() -> set[str]:
    return {s for k in KINDS.values() for s in k.settings}


def _point(data: SearchData, row: TrialRow) -> tuple[dict, dict] | None:
    """(params, distributions) of a trial, as the space's define-by-run spells them."""
    point = data.space.point(row.config)
    if point is None:
        return None
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    scratch.enqueue_trial(point)
    trial = scratch.ask()
    data.space.define_by_run(trial)
    params, dists = dict(trial.params), dict(trial.distributions)
    kind = KINDS.get(str(row.config.get("head")))
    if kind is not None:  # drop settings this head does not read
        unread = _head_only_settings() - set(kind.settings)
        for name in [n for n in params if n in unread]:
            params.pop(name)
            dists.pop(name)
    for name, values in (data.space.grid or {}).items():  # a grid trial: its best head's
        if name in row.config and name not in params:
            params[name], dists[name] = row.config[name], _grid_distribution(values)
    return params, dists


def _grid_distribution(values: list) -> optuna.distributions.BaseDistribution:
    """A grid setting as a parameter of the rebuilt study (numbers: a range, log for a
    learning rate spanning decades)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        lo, hi = float(min(values)), float(max(values))
        if lo < hi:
            return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 10)
    return CategoricalDistribution([json.dumps(v) if isinstance(v, list) else v
                                    for v in dict.fromkeys(map(str, values))])


def study_of(data: SearchData) -> optuna.Study | None:
    """An in-memory study holding the search's trials in order (finished ones COMPLETE with
    their score, failed ones FAIL); None when the space is unknown."""
    if data.space is None:
        return None
    direction = "maximize" if data.mode == "max" else "minimize"
    with _quiet():
        study = optuna.create_study(direction=direction, study_name=data.parent_name)
        # a grid's settings are its best head's, not sampled: shown in slices, not weighed
        study.set_user_attr("grid", sorted(data.space.grid or {}))
        for row in data.trials:
            if row.status == "RUNNING":
                continue
            pd = _point(data, row)
            if pd is None:
                continue
            params, dists = pd
            ok = row.finished
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE if ok else TrialState.FAIL,
                value=row.score if ok else None, params=params, distributions=dists,
                user_attrs={"run_id": row.run_id, "order": row.order}))
    return study


def paper_trial_number(data: SearchData, study: optuna.Study) -> int | None:
    """The study's number of the trial that ran the space's paper config, if one did."""
    paper = (data.space.paper_config if data.space is not None else None) or {}
    if not paper:
        return None
    by_run = {t.run_id: t for t in data.trials}
    for ft in study.trials:
        row = by_run.get(ft.user_attrs.get("run_id"))
        if row is not None and all(_same(row.config.get(k), v) for k, v in paper.items()):
            return ft.number
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _complete(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# ---- slices ---------------------------------------------------------------------------------
def slices(data: SearchData, study: optuna.Study) -> Figure | None:
    """Score against pooling and learning rate, one dot per finished trial."""
    # matplotlib and plotly (optuna.visualization's): only when a figure is drawn
    from optuna.visualization import matplotlib as omp
    from optuna.visualization import plot_slice

    searched = set().union(*(t.params for t in _complete(study))) if _complete(study) else set()
    params = [p for p in SLICE_PARAMS if p in searched]
    if not params:
        return None
    label = data.metric_label
    with _quiet(figsize=(4.3 * len(params) + 1.5, 4.6)):
        axes = omp.plot_slice(study, params=params, target_name=label)
        html = plot_slice(study, params=params, target_name=label)
    axes_list = list(axes.flat) if hasattr(axes, "flat") else [axes]
    fig = axes_list[0].figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in axes_list:  # Optuna orders the panels by name: read each one's parameter
        p = ax.get_xlabel()
        if ax.get_xscale() == "log":  # 0.001 0.002 0.005 0.01 ...: readable, not 10^-3
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        best = ", the grid's best head" if p in study.user_attrs.get("grid", ()) else ""
        ax.set_xlabel(PARAM_LABELS.get(p, p) + best + (" (log scale)" if p == "lr" else ""))
        n = sum(1 for t in _complete(study) if p in t.params)
        ax.set_title(f"{n} trials set it", fontsize=9)
    axes_list[0].set_ylabel(label)
    title = f"Effect of {' and '.join(PARAM_LABELS.get(p, p) for p in params)} on {label}"
    fig.suptitle(f"{title}\n{subtitle(data)}", fontsize=11)
    width = fig.get_size_inches()[0]  # room for the score's axis label on one panel too
    fig.subplots_adjust(left=max(0.08, 0.8 / width), right=0.86, top=0.8, bottom=0.14,
                        wspace=0.1)
    for extra in [a for a in fig.axes if a not in axes_list]:  # Optuna's colour bar overlaps
        extra.remove()
    dots = axes_list[0].collections
    if dots:
        cax = fig.add_axes((0.89, 0.14, 0.02, 0.66))
        fig.colorbar(dots[0], cax=cax).set_label("trial number")
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}; colour = trial number</sup>",
                       yaxis_title=label)
    if len(params) == 1:
        html.update_xaxes(title_text=PARAM_LABELS.get(params[0], params[0]))
    for i, p in enumerate(sorted(params) if len(params) > 1 else [], 1):
        html.update_xaxes(title_text=PARAM_LABELS.get(p, p), row=1, col=i)
    return Figure("slices", title, fig, html)


# ---- importances ----------------------------------------------------------------------------
def importance_params(study: optuna.Study, *, share: float = 0.75) -> tuple[list[str], int]:
    """The parameters to weigh and how many finished trials have all of them: parameters
    are taken most common first while at least ``share`` of the trials keep them all."""
    trials = _complete(study)
    grid = set(study.user_attrs.get("grid", ()))
    counts: dict[str, int] = {}
    for t in trials:
        for p, d in t.distributions.items():
            if not d.single() and p not in grid:
                counts[p] = counts.get(p, 0) + 1
    chosen: list[str] = []
    need = max(MIN_IMPORTANCE_TRIALS, math.ceil(share * len(trials)))
    for p in sorted(counts, key=lambda p: (-counts[p], p)):
        keep = [t for t in trials if set(chosen + [p]) <= set(t.params)]
        if len(keep) >= need:
            chosen.append(p)
    n = len([t for t in trials if set(chosen) <= set(t.params)]) if chosen else 0
    return chosen, n


def importances(data: SearchData, study: optuna.Study) -> Figure | None:
    """fANOVA importances of the parameters over the finished trials."""
    # matplotlib and plotly (optuna.visualization's): only when a figure is drawn
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as omp
    from optuna.visualization import plot_param_importances

    params, n = importance_params(study)
    if len(params) < 2 or n < MIN_IMPORTANCE_TRIALS:
        return None
    label = data.metric_label
    with _quiet(figsize=(8.0, 2.0 + 0.45 * len(params))):
        ax = omp.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                        params=params, target_name=label)
        html = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                      params=params, target_name=label)
    fig = ax.figure
    title = f"Which settings matter for {label} (fANOVA importance)"
    ax.set_title("", loc="left")
    rough = f" (only {n}: a rough guide)" if n < FEW else ""
    ax.set_title(f"{title}\n{subtitle(data)}\nover the {n} of {len(_complete(study))} "
                 f"finished trials that set all of these{rough}", fontsize=10)
    ax.set_xlabel("share of the score's variance explained (sums to 1)")
    ax.set_ylabel("")
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.tight_layout()
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}; {n} trials</sup>",
                       xaxis_title="share of the score's variance explained",
                       yaxis_title="setting")
    return Figure("importances", title, fig, html)


# ---- optimization history -------------------------------------------------------------------
def history(data: SearchData, study: optuna.Study) -> Figure | None:
    """Each trial's score and the best so far against trial number; the paper's config
    marked."""
    # matplotlib and plotly (optuna.visualization's): only when a figure is drawn
    import plotly.graph_objects as go
    from optuna.visualization import matplotlib as omp
    from optuna.visualization import plot_optimization_history

    done = _complete(study)
    if not done:
        return None
    label = data.metric_label
    with _quiet(figsize=(8.5, 4.8)):
        ax = omp.plot_optimization_history(study, target_name=label)
        html = plot_optimization_history(study, target_name=label)
    fig = ax.figure
    title = f"Search progress: {label} of each trial and the best so far"
    ax.set_title(f"{title}\n{subtitle(data)}", fontsize=10)
    ax.set_xlabel("trial number (order the search started them)")
    ax.set_ylabel(f"{label} ({'higher' if data.mode == 'max' else 'lower'} is better)")
    paper = paper_trial_number(data, study)
    if paper is not None and study.trials[paper].state == TrialState.COMPLETE:
        value = study.trials[paper].value
        ax.scatter([paper], [value], marker="*", s=260, color="crimson", zorder=5,
                   label="the paper's config")
        ax.annotate(f"paper's config: {short_score(value)}", (paper, value), textcoords="offset points",
                    xytext=(10, -14), fontsize=9, color="crimson")
        html.add_trace(go.Scatter(x=[paper], y=[value], mode="markers", name="the paper's config",
                                  marker={"symbol": "star", "size": 16, "color": "crimson"}))
    handles, labels = ax.get_legend_handles_labels()
    names = {label: "a trial", "Best Value": "best so far"}
    ax.legend(handles, [names.get(x, x) for x in labels], loc="best", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    html.update_layout(title=f"{title}<br><sup>{subtitle(data)}</sup>",
                       xaxis_title="trial number", yaxis_title=label)
    return Figure("history", title, fig, html)
