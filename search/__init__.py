"""The driver side of a search: the command line, search spaces, building the Ray Tune
Tuner (Optuna chooses, ASHA stops), MLflow records, the champion, export, the figures and
report of a search.

Only this package imports Ray Tune, Optuna or MLflow at module level. Public names are
re-exported here and imported on first use.
"""

from __future__ import annotations

from difftune.trainables.lazy import lazy_exports

_EXPORTS = {
    "Space": "space.spec", "SpaceError": "space.spec", "load_space": "space.spec", "preset_names": "space.spec",
    "build_tuner": "run.tuner", "run_search": "run.search", "resume_search": "run.search",
    "SearchResult": "run.finish", "finish_search": "run.finish",
    "Candidate": "records.best", "best_trial": "records.best", "rank_trials": "records.best",
    "export_best": "records.export", "export_pareto": "records.export",
    "dominates": "records.pareto", "pareto_front": "records.pareto",
    "ChampionClassifier": "records.classifier", "log_classifier": "records.classifier",
    "predict_images": "records.classifier",
    "default_experiment": "records.tracking",
    "Plan": "plan.estimate", "make_plan": "plan.estimate", "parse_size": "space.sizes",
    "evaluate_on_test": "run.evaluation",
    "SearchData": "report.gather", "TrialRow": "report.gather", "gather": "report.gather",
    "write_figures": "report.draw", "trial_label": "report.gather",
    "Figure": "report.figures", "draw_all": "report.draw",
    "publish": "report.publish", "LiveReport": "report.publish",
    "SearchConsole": "report.console",
    "default_storage": "records.optuna_store", "open_storage": "records.optuna_store",
    "main": "cli",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
