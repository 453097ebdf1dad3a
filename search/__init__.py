"""The driver side of a search: the command line, search spaces, building the Ray Tune
Tuner (Optuna chooses, ASHA stops), MLflow records, the champion, export, the figures and
report of a search.

Only this package imports Ray Tune, Optuna or MLflow at module level. Public names are
re-exported here and imported on first use.
"""

from __future__ import annotations

from difftune.trainables.lazy import lazy_exports

_EXPORTS = {
    "Space": "space", "SpaceError": "space", "load_space": "space", "preset_names": "space",
    "build_tuner": "tuner", "run_search": "tuner", "resume_search": "tuner",
    "SearchResult": "finish", "finish_search": "finish",
    "Candidate": "best", "best_trial": "best", "rank_trials": "best",
    "export_best": "export", "export_pareto": "export",
    "dominates": "pareto", "pareto_front": "pareto",
    "ChampionClassifier": "classifier", "log_classifier": "classifier",
    "predict_images": "classifier",
    "default_experiment": "tracking",
    "Plan": "plan", "make_plan": "plan", "parse_size": "sizes",
    "evaluate_on_test": "evaluation",
    "SearchData": "report", "TrialRow": "report", "gather": "report",
    "write_figures": "report", "trial_label": "report",
    "Figure": "figures", "draw_all": "figures",
    "publish": "publish", "LiveReport": "publish",
    "SearchConsole": "console",
    "default_storage": "optuna_store", "open_storage": "optuna_store",
    "main": "cli",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
