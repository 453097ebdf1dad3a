"""The parent run's description (``mlflow.note.content``, shown on its run page): a short
markdown report of the search: the space, the plan (when one was made), the top trials, the
champion with its val and test scores, and the figures.

It reads what the tracking store holds (:class:`~.report.SearchData`) and leaves out what a
search did not record (no plan, no test score yet, a search still running).
"""

from __future__ import annotations

from typing import Any

from difftune.search.report import (
    FIGURES_DIR,
    SearchData,
    TrialRow,
    metric_label,
    score_text,
    trial_label,
)

NOTE_TAG = "mlflow.note.content"
#: rows of the top-trials table
TOP = 5
FIGURE_NAMES = {
    "block_timestep": "best score per block x timestep",
    "slices": "pooling and learning rate",
    "importances": "parameter importances (fANOVA)",
    "history": "optimization history",
    "cost": "score against extraction GFLOPs, Pareto front",
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
    return (f"`{s.name}`: model {s.model} on {s.data}; {s.search.get('trials')} trials, "
            f"{data.metric} ({data.mode}); searched: {params or 'nothing'}")


def plan_line(plan: dict[str, Any] | None) -> str | None:
    """The plan's own one-line summary, else its scalar entries."""
    if not plan:
        return None
    for key in ("line", "summary", "text"):
        if isinstance(plan.get(key), str):
            return plan[key]
    items = [f"{k} {v}" for k, v in plan.items() if isinstance(v, (int, float, str, bool))]
    return ", ".join(items[:8]) or None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.1 else f"{v:.2f}"
    return str(v)


def _row(rank: int, t: TrialRow, data: SearchData, test: bool) -> str:
    from difftune.search.report import reads

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
    champ = data.champion
    label = metric_label(data.metric)
    if champ is not None:
        test = champ.metrics.get("test_top1", data.parent_metrics.get("test_top1"))
        test_part = f", {score_text('test_top1', test)}" if test is not None else \
            ", test top-1 not measured"
        registered = data.parent_tags.get("difftune.model_name")
        alias = f", registered as `{registered}@champion`" if (
            registered and data.champion_run_id) else ""
        word = "Champion" if data.champion_run_id else "Best so far"
        lines += ["", f"**{word}**: {trial_label(champ.config)}: "
                  f"{score_text(data.metric, champ.score)}{test_part} ([run](#/experiments/{data.experiment_id}/runs/"
                  f"{champ.run_id})){alias}."]
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
