"""difftune: which frozen guided-diffusion U-Net features (block, timestep, pooling) and which
head on top of them classify a dataset best, searched with Ray Tune + Optuna, recorded in
MLflow, with extracted features cached in Arrow files.

The package has three parts (in the repository they are top-level folders):

- :mod:`difftune.trainables`: what one trial does (plain PyTorch + pyarrow);
- :mod:`difftune.search`: the driver (CLI, spaces, Tuner, MLflow);
- :mod:`difftune.spaces`: search-space presets (YAML).

Public names are re-exported here and imported on first use, e.g.
``from difftune import load_space, Extractor, load_unet``.
"""

from __future__ import annotations

from difftune.trainables.lazy import lazy_exports

__version__ = "0.1.0"

_TRAINABLES = ("TrialConfig", "UserError", "ConfigError", "Geometry", "geometry_of_flags",
               "load_unet", "model_fingerprint", "Extractor", "block_shapes", "load_dataset",
               "HEAD_TYPES", "KINDS", "HeadKind", "build_head", "head_kind", "train_head",
               "evaluate", "run_trial", "DirectFeatures", "FeatureCache", "OnlineFeatures",
               "save_head", "load_head", "probe_grid", "classify", "Grid", "run_grid_trial",
               "trial_gflops")
_SEARCH = ("Space", "SpaceError", "load_space", "preset_names", "build_tuner", "run_search",
           "resume_search", "SearchResult", "export_best", "export_pareto", "pareto_front",
           "predict_images", "gather", "write_figures", "publish", "main")
_EXPORTS = {**dict.fromkeys(_TRAINABLES, "trainables"), **dict.fromkeys(_SEARCH, "search")}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
