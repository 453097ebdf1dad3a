"""The parent run's description (``mlflow.note.content``, shown on its run page): a short
markdown report of the search: the space, the plan (when one was made), the top trials, the
champion with its val and test scores, and the figures.

It reads what the tracking store holds (:class:`~.gather.SearchData`) and leaves out what a
search did not record (no plan, no test score yet, a search still running).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from difftune.search.plan.estimate import Plan
from difftune.search.report.gather import (
    FIGURES_DIR,
    SearchData,
    TrialRow,
    metric_label,
    reads,
    score_text,
    trial_label,
)
from difftune.search.report.probe_figure import TAG as PROBE_TAG
from difftune.search.report.probe_figure import probe_line

NOTE_TAG = "mlflow.note.content"
#: rows of the top-trials table
TOP = 5
FIGURE_NAMES = {
    "block_timestep": "best score per block x timestep",
    "slices": "pooling and learning rate",
    "importances": "parameter importances (fANOVA)",
    "history": "optimization history",
    "cost": "score against GFLOPs per image, with the Pareto front",
    "pareto": "the Pareto front of the search's first two objectives",
    "curves": "learning curves of the top trials",
}


def _spec(spec: dict[str, Any]) -> str:
    if "choice" in spec:
        vals = list(spec["choice"])
        return "{" + ", ".join(str(v) for v in vals) + "}"
    if "subset" in spec:
        return "subsets of {" + ", ".join(str(v) for v in spec["subset"]) + "}"
    kind = "int" if "int" in spec else "float"
    lo, hi = spec[kind]
    extra = f" step {spec['step']}" if spec.get("step") else ""
    extra += " (log)" if spec.get("log") else ""
    return f"{lo}..{hi}{extra}"


def space_line(data: SearchData) -> str:
    s = data.space
    if s is None:
        return "the space is not recorded (no space.yaml)"
    params = ", ".join(f"{k} {_spec(v)}" for k, v in s.params.items())
    goals = ", ".join(f"{o['metric']} ({o['mode']})" for o in data.objectives())
    grid = "; a grid in every trial: " + ", ".join(
        f"{k} {_spec({'choice': v})}" for k, v in s.grid.items()) if s.grid else ""
    return (f"`{s.name}`: model {s.model} on {s.data}; {s.search.get('trials')} trials, "
            f"{goals}; searched: {params or 'nothing'}{grid}")


def plan_line(plan: dict[str, Any] | None) -> str | None:
    """The plan's own one-line summary (``plan.json`` as ``difftune search`` records it:
    :meth:`~.plan.Plan.summary`), else its scalar entries."""
    if not plan:
        return None
    for key in ("line", "summary", "text"):
        if isinstance(plan.get(key), str):
            return plan[key]
    try:
        names = {f.name for f in dataclasses.fields(Plan)}
        return Plan(**{k: v for k, v in plan.items() if k in names}).summary() \
            .removeprefix("plan: ")
    except (TypeError, KeyError, ValueError, ArithmeticError):
        pass  # another plan's format: its scalar entries
    items = [f"{k} {v}" for k, v in plan.items() if isinstance(v, (int, float, str, bool))]
    return ", ".join(items[:8]) or None


def confirm_line(data: SearchData) -> str:
    """The confirm stage: the top configs retrained, their search and confirmed scores, and
    how far the search's ranking held (``confirm_spearman``)."""
    by_run = {t.run_id: t for t in data.trials}
    fraction = data.space.search.get("confirm_label_fraction") if data.space else None
    pairs = []
    for c in data.confirmed:
        search = by_run.get(c.confirms or "")
        pairs.append(f"{trial_label(c.config)} {_fmt(search.score if search else None)} -> "
                     f"{_fmt(c.score)}")
    rho = data.parent_metrics.get("confirm_spearman")
    where = "all labels" if fraction is None else f"label fraction {fraction}"
    label = metric_label(data.metric).removesuffix(" (%)")
    return (f"**Confirmed** (the top {len(data.confirmed)} retrained on {where}; {label} in "
            "the search -> confirmed): " + "; ".join(pairs)
            + (f"; Spearman {rho:.2f}." if rho is not None else "."))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.1 else f"{v:.2f}"
    return str(v)


def _row(rank: int, t: TrialRow, data: SearchData, test: bool) -> str:

    blocks, times = reads(t.config)
    cells = [str(rank), f"[{trial_label(t.config)}](#/experiments/{data.experiment_id}/runs/"
             f"{t.run_id})", str(t.config.get("head", "-")),
             "+".join(map(str, blocks)) or "-", "+".join(map(str, times)) or "-",
             _fmt(t.config.get("pool")), _fmt(t.config.get("lr")), str(t.epochs),
             _fmt(t.score)]
    if test:
        cells.append(_fmt(t.metrics.get("test_top1")))
    return "| " + " | ".join(cells) + " |"


def _figure(data: SearchData, name: str) -> str:
    """A figure's description with links to its PNG and HTML (served by the MLflow UI's
    artifact endpoint, relative to the page)."""
    links = " ".join(
        f"[{ext}](get-artifact?path={FIGURES_DIR}%2F{name}.{ext}&run_uuid={data.parent_run_id})"
        for ext in ("png", "html"))
    return f"{FIGURE_NAMES.get(name, name)} ({links})"


def _registered(data: SearchData) -> str:
    """Where the champion went: ``model@champion``, or the version registered while the alias
    stayed on a better head (:mod:`.champion`'s rule; the parent run's tag says why)."""
    name = data.parent_tags.get("difftune.model_name")
    if not (name and data.champion_run_id):
        return ""
    said = data.parent_tags.get("difftune.champion", "")
    if said and "(alias moved)" not in said:
        return f"; `{name}` {said} (the alias `champion` stayed)"
    return f", registered as `{name}@champion`"


def note(data: SearchData, figures: list[str] | None = None) -> str:
    """The markdown description of a search's parent run."""
    counts = data.counts
    state = data.parent_status.lower()
    done = sum(t.finished for t in data.trials)
    failed = counts.get("FAILED", 0)
    lines = [f"### difftune search `{data.parent_name}` ({state})", "",
             f"**Space** {space_line(data)}.", "",
             f"**Trials**: {len(data.trials)} recorded, {done} finished, "
             f"{counts.get('RUNNING', 0)} running, {failed} failed."]
    plan = plan_line(data.plan)
    if plan:
        lines += ["", f"**Plan**: {plan}"]
    probe = probe_line(data.parent_tags.get(PROBE_TAG), data.parent_run_id)  # probe rung
    if probe:
        lines += ["", probe]
    champ = data.champion
    label = metric_label(data.metric)
    confirmed = data.champion_confirmed
    if confirmed is not None:  # the champion is a confirm run: its scores are those
        champ = confirmed
    if champ is not None:
        test = champ.metrics.get("test_top1", data.parent_metrics.get("test_top1"))
        test_part = f", {score_text('test_top1', test)}" if test is not None else \
            ", test top-1 not measured"
        alias = _registered(data)
        word = "Champion" if data.champion_run_id else "Best so far"
        lines += ["", f"**{word}**: {trial_label(champ.config)}: "
                  f"{score_text(data.metric, champ.score)}"
                  f"{' (confirmed)' if confirmed is not None else ''}{test_part} "
                  f"([run](#/experiments/{data.experiment_id}/runs/{champ.run_id})){alias}."]
    failure = data.parent_tags.get("difftune.failure")
    if failure:
        lines += ["", f"**Failed**: {failure.splitlines()[0][:500]}"]
    if data.confirmed:
        lines += ["", confirm_line(data)]
    ranked = data.ranked()[:TOP]
    if ranked:
        test = any("test_top1" in t.metrics for t in ranked)
        head = ["#", "trial", "head", "block", "t", "pool", "lr", "epochs", label]
        if test:
            head.append("test top-1 (%)")
        lines += ["", f"**Top {len(ranked)} trials**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        lines += [_row(i, t, data, test) for i, t in enumerate(ranked, 1)]
    if figures:
        lines += ["", f"**Figures** (artifacts `{FIGURES_DIR}/`, each to look at and to "
                  "explore): " + "; ".join(_figure(data, n) for n in figures) + "."]
    return "\n".join(lines) + "\n"
