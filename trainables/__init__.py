"""What one trial does: model loading, data, feature extraction, the feature cache, heads,
the training loop, and (in :mod:`.trainable` only) the Ray Tune function trainable.

Plain PyTorch + pyarrow: nothing here imports Ray Tune, Optuna or MLflow at module level,
so every piece of a trial runs and tests without Ray. Public names are re-exported here and
imported on first use.
"""

from __future__ import annotations

from difftune.trainables.lazy import lazy_exports

#: public name -> module (below this package) defining it
_EXPORTS = {
    "UserError": "errors", "ConfigError": "errors", "SearchFailed": "errors",
    "TrialConfig": "config",
    "decode": "params", "trial_config": "params",
    "Geometry": "model.geometry", "geometry_of_flags": "model.geometry", "geometry_of_model": "model.geometry",
    "load_unet": "model.unet", "model_fingerprint": "model.unet",
    "Extractor": "model.features", "block_shapes": "model.features",
    "BlockCost": "model.cost", "model_costs": "model.cost", "unet_costs": "model.cost", "trial_gflops": "trial",
    "activation_bytes_per_image": "model.cost", "batch_for_memory": "model.cost", "entry_bytes": "model.cost",
    "load_dataset": "data.datasets", "load_image": "data.datasets", "class_names": "data.datasets",
    "files_fingerprint": "data.fingerprint", "data_fingerprint": "data.fingerprint",
    "DataError": "data.datasets", "CorruptImage": "data.datasets",
    "ViewCycle": "data.views", "crop_flip": "data.views",
    "check_setting": "config", "LIMITS": "config",
    "classify": "model.classify", "image_keys": "model.classify",
    "HEAD_TYPES": "heads", "KINDS": "heads", "HeadKind": "heads", "build_head": "heads",
    "head_kind": "heads",
    "train_head": "train.loop", "evaluate": "train.loop",
    "run_trial": "pipeline", "DirectFeatures": "pipeline", "evaluate_on": "pipeline",
    "FeatureCache": "cache.feature_cache", "OnlineFeatures": "model.online",
    "extract_sharded": "cache.shard", "ShardJob": "cache.shard",
    "save_head": "heads.checkpoint", "load_head": "heads.checkpoint",
    "probe_grid": "train.probe",
    "Grid": "train.grid", "GridError": "train.grid", "HeadGrid": "train.grid_heads", "build_grid": "train.grid_heads",
    "run_grid_trial": "pipeline", "train_grid": "train.loop", "train_heads": "train.loop",
    "Trial": "trial", "resolve": "trial", "checked_config": "heads",
    "Progress": "progress",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
