"""What one trial does: model loading, data, feature extraction, the feature cache, heads,
the training loop, and (in :mod:`.trainable` only) the Ray Tune function trainable.

Plain PyTorch + pyarrow: nothing here imports Ray Tune, Optuna or MLflow at module level,
so every piece of a trial runs and tests without Ray. Public names are re-exported here and
imported on first use.
"""

from __future__ import annotations

from .lazy import lazy_exports

#: public name -> module (below this package) defining it
_EXPORTS = {
    "UserError": "errors", "ConfigError": "errors", "SearchFailed": "errors",
    "TrialConfig": "config",
    "decode": "params", "trial_config": "params",
    "Geometry": "geometry", "geometry_of_flags": "geometry", "geometry_of_model": "geometry",
    "load_unet": "unet", "model_fingerprint": "unet",
    "Extractor": "features", "block_shapes": "features",
    "BlockCost": "cost", "model_costs": "cost", "unet_costs": "cost", "trial_gflops": "cost",
    "activation_bytes_per_image": "cost", "batch_for_memory": "cost", "entry_bytes": "cost",
    "load_dataset": "data", "load_image": "data", "class_names": "data",
    "files_fingerprint": "fingerprint", "data_fingerprint": "fingerprint",
    "DataError": "data", "CorruptImage": "data",
    "ViewCycle": "views", "crop_flip": "views",
    "check_setting": "config", "LIMITS": "config",
    "classify": "classify", "image_keys": "classify",
    "HEAD_TYPES": "heads", "KINDS": "heads", "HeadKind": "heads", "build_head": "heads",
    "head_kind": "heads",
    "train_head": "train", "evaluate": "train",
    "run_trial": "pipeline", "DirectFeatures": "pipeline", "evaluate_on": "pipeline",
    "FeatureCache": "cache", "OnlineFeatures": "online",
    "extract_sharded": "cache_shard", "ShardJob": "cache_shard",
    "save_head": "checkpoint", "load_head": "checkpoint",
    "probe_grid": "probe",
    "Grid": "grid", "GridError": "grid", "HeadGrid": "grid_heads", "build_grid": "grid_heads",
    "run_grid_trial": "grid_train", "train_grid": "grid_train",
    "Progress": "progress",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
