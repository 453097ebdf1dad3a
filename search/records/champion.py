"""The champion: the best trial's head logged on its run (as a head checkpoint and as an
image classifier), the classifier registered (a new version every search), the best config
put on the parent run, and the alias ``champion`` moved to it, unless it scores worse than
the current champion of the same model and data.

Nothing the champion logs is unpickled to load it: the bare head is a head checkpoint folder
(``head_checkpoint/``: ``head.pt``, the head's state_dict, read with
``torch.load(weights_only=True)``, and ``meta.json``, the config and shapes it is rebuilt
from; :func:`load_logged_head`), and the classifier is MLflow "models from code"
(:mod:`.classifier`). The classifier carries the one copy of the difftune package (its
sources and presets, :func:`package_snapshot`) and of the demo U-Net (its ``unet/``
artifact) that a search logs.

The alias rule: every version carries what it was selected on (``difftune.model``,
``difftune.data``, ``difftune.holdout``, ``difftune.metric``, ``difftune.mode``,
``difftune.score``: the search's metric on val). A new version whose score is worse than the
aliased version's, for the same model, data, holdout and metric, is registered but the alias
stays; the version's ``difftune.champion`` tag and the parent run's say why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from difftune.search.records.classifier import log_classifier

logger = logging.getLogger(__name__)

#: what a copy of the installed package holds (its root is the repository in an editable
#: install, which also holds tests/, benchmarks/, ...)
PACKAGE_PARTS = ("__init__.py", "search", "trainables", "spaces")
#: the artifact folder of the bare head on the champion's run (a head checkpoint)
HEAD_ARTIFACT = "head_checkpoint"


def package_snapshot(dest: Path) -> Path:
    """A copy of the ``difftune`` package as ``dest/difftune`` (sources, presets, the demo
    U-Net's flags): what the classifier ships so that it loads where difftune is not
    installed. The demo U-Net's weights are left out: the classifier bundles them itself
    (its ``unet/`` artifact), so a search logs them once."""
    import difftune
    from difftune.trainables.model.unet import DEMO_CHECKPOINT

    src, out = Path(difftune.__file__).parent, dest / "difftune"
    out.mkdir(parents=True)
    for part in PACKAGE_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, out / part, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", DEMO_CHECKPOINT.name))
        else:
            shutil.copy2(src / part, out / part)
    return out


def bare_head(checkpoint_dir: str | Path, dest: Path) -> Path:
    """The trained head alone as a head checkpoint folder ``dest`` (``head.pt`` holds its
    state_dict only: no optimizer state, no grid of a grid trial; ``meta.json`` as the
    trial wrote it)."""
    import torch

    from difftune.trainables.heads.checkpoint import HEAD_FILE, META_FILE, read_checkpoint

    state, _ = read_checkpoint(checkpoint_dir)
    dest.mkdir(parents=True)
    torch.save({"head": state["head"]}, dest / HEAD_FILE)
    shutil.copy2(Path(checkpoint_dir) / META_FILE, dest / META_FILE)
    return dest


def load_logged_head(client: MlflowClient, run_id: str, *, dest: str | Path,
                     device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """The bare head the champion's run ``run_id`` holds, rebuilt from its checkpoint
    (downloaded into ``dest``; nothing unpickled): ``(head, TrialConfig, {"meta",
    "state"})`` as :func:`~difftune.trainables.heads.checkpoint.load_head` returns them."""
    from difftune.trainables.heads.checkpoint import load_head

    local = client.download_artifacts(run_id, HEAD_ARTIFACT, str(dest))
    return load_head(local, device=device)


@dataclass(frozen=True)
class Registered:
    """What :func:`log_champion` did: the new version, and whether the alias moved to it."""

    version: int
    alias_moved: bool
    reason: str


#: what a version was selected on: the alias compares versions that agree on these
SAME = ("difftune.model", "difftune.data", "difftune.holdout", "difftune.metric",
        "difftune.mode")
ALIAS = "champion"


def selection_tags(config: dict[str, Any], *, metric: str, mode: str, score: float
                   ) -> dict[str, str]:
    """The tags a version carries for the alias rule."""
    return {"difftune.model": f"{config.get('model')}|{config.get('checkpoint') or ''}",
            "difftune.data": str(config.get("data")),
            "difftune.holdout": str(config.get("holdout")),
            "difftune.metric": metric, "difftune.mode": mode, "difftune.score": repr(score)}


def alias_decision(client: MlflowClient, model_name: str, tags: dict[str, str]
                   ) -> tuple[bool, str]:
    """``(move, reason)``: whether the ``champion`` alias may move to a version with ``tags``."""
    try:
        current = client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException:
        return True, "first champion of this model name"
    cur = current.tags or {}
    if any(cur.get(k) != tags[k] for k in SAME) or "difftune.score" not in cur:
        return True, (f"version {current.version} was selected on other model/data/metric; "
                      "not comparable")
    old, new = float(cur["difftune.score"]), float(tags["difftune.score"])
    worse = new < old if tags["difftune.mode"] == "max" else new > old
    metric = tags["difftune.metric"]
    if worse:
        return False, (f"alias kept on version {current.version}: {metric} {new:.4g} is worse "
                       f"than its {old:.4g} (same model, data and metric)")
    return True, f"{metric} {new:.4g} is not worse than version {current.version}'s {old:.4g}"


def log_champion(client: MlflowClient, *, tracking_uri: str, parent_run_id: str,
                 best_run_id: str, checkpoint_dir: str, model_name: str,
                 best_config: dict[str, Any], metric_value: float, metric: str = "val_top1",
                 mode: str = "max", test_metrics: dict[str, float] | None = None
                 ) -> Registered:
    """Log the best trial's head on its run as a head checkpoint (``head_checkpoint/``,
    :func:`load_logged_head`) and as an image classifier (``classifier``, :mod:`.classifier`),
    register the classifier under ``model_name``, move the alias ``champion`` to it unless it
    scores worse than the current champion (:func:`alias_decision`), and put the best config,
    ``best_<metric>`` and the test metrics on the parent run.
    """
    from difftune.trainables.heads.checkpoint import load_head

    head, cfg, loaded = load_head(checkpoint_dir)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as stage, mlflow.start_run(run_id=best_run_id):
        # the head alone, loadable without unpickling (state_dict + the spec it is built from)
        mlflow.log_artifacts(str(bare_head(checkpoint_dir, Path(stage) / HEAD_ARTIFACT)),
                             artifact_path=HEAD_ARTIFACT)
        # what is registered: images in, a label per image out (signature, input example);
        # the one copy of the difftune package a search logs
        code = package_snapshot(Path(stage))
        info = log_classifier(head, cfg, loaded["meta"], stage=Path(stage) / "classifier",
                              code_path=code)
    tags = selection_tags(best_config, metric=metric, mode=mode, score=metric_value)
    move, reason = alias_decision(client, model_name, tags)
    with contextlib.redirect_stderr(io.StringIO()) as said:  # it prints; keep it in the log
        mv = mlflow.register_model(info.model_uri, model_name)
    for line in said.getvalue().splitlines():
        logger.debug("%s", line)
    for k, v in {**tags, "run_id": best_run_id, "difftune.champion": reason}.items():
        client.set_model_version_tag(model_name, mv.version, k, v)
    if move:
        client.set_registered_model_alias(model_name, ALIAS, mv.version)
    else:
        logger.warning("registered version %s of %s; %s", mv.version, model_name, reason)
    client.log_text(parent_run_id, yaml.safe_dump(best_config, sort_keys=True), "best_config.yaml")
    client.log_metric(parent_run_id, f"best_{metric}", metric_value)
    for k, v in (test_metrics or {}).items():
        client.log_metric(parent_run_id, k, v)
    client.set_tag(parent_run_id, "best_run_id", best_run_id)
    client.set_tag(parent_run_id, "difftune.champion",
                   f"version {mv.version}{' (alias moved)' if move else ''}: {reason}")
    return Registered(int(mv.version), move, reason)
