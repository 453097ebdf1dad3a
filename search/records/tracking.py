"""Recording a search in MLflow: one parent run per search (its space, settings and code
version), one nested child run per trial (:mod:`~difftune.search.run.trials`), the champion
(:mod:`.champion`), and finding a search's runs again (``--resume``, ``export``, ``report``).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from difftune.search.records.uris import TrackingError, artifact_root, redact

logger = logging.getLogger(__name__)

TAG_ROLE = "difftune.role"
TAG_TRIAL = "difftune.trial_id"
TAG_CONFIG = "difftune.config"
TAG_RUNTIME = "difftune.runtime"


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("difftune")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def default_experiment(space) -> str:
    """The experiment a search records into when ``--experiment`` is not given:
    ``difftune-SPACE-DATA`` (DATA: ``digits`` or the data folder's name), with the model's
    name appended when it is not the space's own; the demo search keeps ``difftune-demo``.
    Two searches of different data never share an experiment (nor a champion alias)."""
    data = "digits" if space.data == "digits" else Path(space.data).resolve().name
    parts = [space.name, data]
    own_model = (space.raw or {}).get("model") or "demo"
    if space.model != own_model:
        parts.append(Path(space.model).stem)
    if parts == ["demo", "digits"]:
        return "difftune-demo"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "difftune-" + "-".join(parts))


def start_parent_run(client: MlflowClient, experiment: str, *, space_dict: dict[str, Any],
                     runtime: dict[str, Any], tune_path: str, model_name: str,
                     artifact_location: str | None = None) -> str:
    """Create the search's parent run with the resolved space; returns its run id.

    :param artifact_location: where a new experiment keeps its artifacts (None:
        :func:`~.uris.artifact_root` of the store)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_location or artifact_root(client.tracking_uri,
                                                                         experiment))
    runtime = {**runtime, "cache": redact(runtime.get("cache"))}  # never holds one: refused
    run = client.create_run(exp_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={TAG_ROLE: "search", TAG_RUNTIME: json.dumps(runtime),
                                  "difftune.tune_path": tune_path,
                                  "difftune.model_name": model_name})
    search = space_dict["search"]
    params = {"space": space_dict["name"], "model": space_dict["model"],
              "checkpoint": str(space_dict["checkpoint"]), "data": space_dict["data"],
              "seed": search["seed"], "trials": search["trials"], "metric": search["metric"],
              "mode": search["mode"],
              "code_version": code_version()}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, yaml.safe_dump(space_dict, sort_keys=False), "space.yaml")
    return run.info.run_id


def latest_search_run(client: MlflowClient, experiment: str, *, what: str):
    """The latest parent run of ``experiment``; a clear error when there is none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise TrackingError(f"{what} {experiment!r}: no such experiment in the tracking store; "
                            f"experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"{what} {experiment!r}: the experiment holds no difftune search")
    return runs[0]


def trial_run_ids(client: MlflowClient, parent_run_id: str) -> dict[str, str]:
    """trial id -> child run id of a search."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10000)
    return {r.data.tags[TAG_TRIAL]: r.info.run_id for r in runs if TAG_TRIAL in r.data.tags}


def space_from_run(client: MlflowClient, parent_run_id: str):
    """The resolved space a search ran with, from its parent run's ``space.yaml``."""
    import tempfile

    from difftune.search.space.spec import Space

    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(parent_run_id, "space.yaml", d)
        data = yaml.safe_load(Path(path).read_text())
    return Space(**data)


def record_skipped_images(client: MlflowClient, parent: str, data: str, mode: str) -> None:
    """With ``bad_images: skip``: the images left out, counted and listed on the parent run."""
    if mode != "skip":
        return
    from difftune.trainables.data.datasets import skipped_images

    bad = skipped_images(data)
    client.log_metric(parent, "bad_images_skipped", len(bad))
    if bad:
        client.log_text(parent, "\n".join(bad) + "\n", "bad_images.txt")
        logger.warning("bad_images: skip: %d unreadable image(s) left out (first: %s)",
                       len(bad), bad[0])
