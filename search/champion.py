"""The champion: the best trial's head logged on its run (as a PyTorch model and as an image
classifier), the classifier registered with the alias ``champion``, and the best config put
on the parent run."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from difftune.search.classifier import log_classifier

logger = logging.getLogger(__name__)

#: what a copy of the installed package holds (its root is the repository in an editable
#: install, which also holds tests/, benchmarks/, ...)
PACKAGE_PARTS = ("__init__.py", "search", "trainables", "spaces")


def package_snapshot(dest: Path) -> Path:
    """A copy of the ``difftune`` package as ``dest/difftune`` (sources, presets, assets):
    what a logged model ships so that it loads where difftune is not installed."""
    import difftune

    src, out = Path(difftune.__file__).parent, dest / "difftune"
    out.mkdir(parents=True)
    for part in PACKAGE_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, out / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src / part, out / part)
    return out


def log_champion(client: MlflowClient, *, tracking_uri: str, parent_run_id: str,
                 best_run_id: str, checkpoint_dir: str, model_name: str,
                 best_config: dict[str, Any], metric_value: float) -> int:
    """Log the best trial's head on its run as an MLflow PyTorch model (``head``) and as an
    image classifier (``classifier``, :mod:`.classifier`), register the classifier under
    ``model_name`` with the alias ``champion``, and put the best config on the parent run.

    :return: the registered model version.
    """
    from difftune.trainables.checkpoint import HEAD_FILE, META_FILE, load_head

    head, cfg, loaded = load_head(checkpoint_dir)
    mlflow.set_tracking_uri(tracking_uri)
    # the pickle format is deliberate (every head type, code shipped beside it): no warning
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as stage, mlflow.start_run(run_id=best_run_id):
        # the head alone (a grid trial's checkpoint also holds grid.pt, to resume the grid)
        for name in (HEAD_FILE, META_FILE):
            mlflow.log_artifact(str(Path(checkpoint_dir) / name), artifact_path="head_checkpoint")
        # pickled with the difftune package beside it, so every head type loads anywhere
        code = package_snapshot(Path(stage))
        mlflow.pytorch.log_model(head, name="head", code_paths=[str(code)],
                                 serialization_format="pickle", pip_requirements=["torch"])
        # what is registered: images in, a label per image out (signature, input example)
        info = log_classifier(head, cfg, loaded["meta"], stage=Path(stage) / "classifier",
                              code_path=code)
    mv = mlflow.register_model(info.model_uri, model_name)
    client.set_registered_model_alias(model_name, "champion", mv.version)
    client.set_model_version_tag(model_name, mv.version, "run_id", best_run_id)
    client.log_text(parent_run_id, yaml.safe_dump(best_config, sort_keys=True), "best_config.yaml")
    client.log_metric(parent_run_id, "best_val_top1", metric_value)
    client.set_tag(parent_run_id, "best_run_id", best_run_id)
    return int(mv.version)
