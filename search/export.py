"""Reading the best configs of a search back from MLflow (``difftune export``): the top K
trials by :mod:`.best`'s rule, each with everything ``difftune train`` needs to rerun it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from difftune.search.best import Candidate, rank_trials
from difftune.search.tracking import TAG_CONFIG, TAG_RUNTIME, latest_search_run
from difftune.search.uris import TrackingError, check_reachable, redact
from difftune.trainables.config import TrialConfig

logger = logging.getLogger(__name__)


def trial_candidates(client: MlflowClient, parent, *, metric: str) -> list[Candidate]:
    """Every trial run of a search as a :class:`Candidate` (score: ``metric`` at the last
    epoch the run recorded; order: when the run started)."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=50000)
    out = []
    for r in runs:
        if TAG_CONFIG not in r.data.tags:
            continue
        m = r.data.metrics
        out.append(Candidate(key=r.info.run_id, order=r.info.start_time or 0,
                             score=m.get(metric), epochs=int(m.get("epoch", 0)),
                             ok=r.info.status == "FINISHED", data=r))
    return out


def export_best(tracking_uri: str, experiment: str, *, top: int = 1,
                search_run: str | None = None) -> dict[str, Any]:
    """The top ``top`` trials of a search (its latest unless ``search_run``), best first:
    ``{experiment, tracking_uri, search_run_id, metric, mode, runtime, configs: [{rank,
    run_id, val_top1, val_top5, <metric>, config}]}``."""
    check_reachable(tracking_uri, must_exist=True)
    client = MlflowClient(tracking_uri)
    if search_run is None:
        parent = latest_search_run(client, experiment, what="--experiment")
    else:
        parent = client.get_run(search_run)
    metric = parent.data.params.get("metric", "val_top1")
    mode = parent.data.params.get("mode", "max")
    ranked = rank_trials(trial_candidates(client, parent, metric=metric), mode=mode)[:top]
    if not ranked:
        raise TrackingError(f"experiment {experiment!r} has no finished trial to export "
                            f"(search run {parent.info.run_id})")
    configs = []
    for i, c in enumerate(ranked, 1):
        r = c.data
        cfg = TrialConfig.from_dict(json.loads(r.data.tags[TAG_CONFIG])).to_dict()
        configs.append({"rank": i, "run_id": r.info.run_id,
                        "val_top1": r.data.metrics.get("val_top1"),
                        "val_top5": r.data.metrics.get("val_top5"), metric: c.score,
                        "config": cfg})
    return {"experiment": experiment, "tracking_uri": redact(tracking_uri),
            "search_run_id": parent.info.run_id, "metric": metric, "mode": mode,
            "runtime": json.loads(parent.data.tags.get(TAG_RUNTIME, "{}")), "configs": configs}


def write_yaml_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write YAML through a temp file + rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
