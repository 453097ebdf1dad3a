"""Reading the best configs of a search back from MLflow (``difftune export``): the top K
trials by :mod:`.best`'s rule, or every trial on the Pareto front of a multi-objective
search (:mod:`.pareto`), each with everything ``difftune train`` needs to rerun it. A grid
trial's entry is the plain config of its best head (its grid point put in)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from difftune.search.records.best import Candidate, rank_trials
from difftune.search.records.pareto import front_rows
from difftune.search.records.tracking import (
    TAG_CONFIG,
    TAG_RUNTIME,
    latest_search_run,
    space_from_run,
)
from difftune.search.records.uris import TrackingError, check_reachable, redact
from difftune.trainables.config import TrialConfig
from difftune.trainables.train.grid import GRID_BEST, with_point

logger = logging.getLogger(__name__)


def trial_candidates(client: MlflowClient, parent, *, metric: str) -> list[Candidate]:
    """Every trial run of a search as a :class:`Candidate` (score: ``metric`` at the last
    epoch the run recorded; order: when the run started). A search with a confirm stage is
    ranked by its confirmed runs only (its champion is the best confirmed config)."""
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
                             ok=r.info.status == "FINISHED", data=r,
                             rung=int(m.get("image_rung", 0))))
    confirmed = [c for c in out if c.data.data.tags.get("difftune.stage") == "confirm"]
    return confirmed or out


def _search_run(client: MlflowClient, experiment: str, search_run: str | None):
    if search_run is None:
        return latest_search_run(client, experiment, what="--experiment")
    return client.get_run(search_run)


def run_config(run) -> dict[str, Any]:
    """The plain trial config of a trial run's head (a grid trial's best grid point in)."""
    settings = with_point(json.loads(run.data.tags[TAG_CONFIG]), run.data.tags.get(GRID_BEST))
    return TrialConfig.from_dict(settings).to_dict()


def _entry(rank: int, run, values: dict[str, Any]) -> dict[str, Any]:
    return {"rank": rank, "run_id": run.info.run_id,
            "val_top1": run.data.metrics.get("val_top1"),
            "val_top5": run.data.metrics.get("val_top5"), **values,
            **{k: run.data.metrics[k] for k in ("test_top1", "test_top5")
               if k in run.data.metrics},
            "config": run_config(run)}


def _document(experiment: str, tracking_uri: str, parent, metric: str, mode: str,
              configs: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {"experiment": experiment, "tracking_uri": redact(tracking_uri),
            "search_run_id": parent.info.run_id, "metric": metric, "mode": mode, **more,
            "runtime": json.loads(parent.data.tags.get(TAG_RUNTIME, "{}")), "configs": configs}


def export_best(tracking_uri: str, experiment: str, *, top: int = 1,
                search_run: str | None = None) -> dict[str, Any]:
    """The top ``top`` trials of a search (its latest unless ``search_run``), best first:
    ``{experiment, tracking_uri, search_run_id, metric, mode, runtime, configs: [{rank,
    run_id, val_top1, val_top5, <metric>, epochs, [test_top1, test_top5,] config}]}``
    (test figures only for a run that was evaluated on test: the champion)."""
    check_reachable(tracking_uri, must_exist=True)
    client = MlflowClient(tracking_uri)
    parent = _search_run(client, experiment, search_run)
    metric = parent.data.params.get("metric", "val_top1")
    mode = parent.data.params.get("mode", "max")
    ranked = rank_trials(trial_candidates(client, parent, metric=metric), mode=mode)[:top]
    if not ranked:
        raise TrackingError(f"experiment {experiment!r} has no finished trial to export "
                            f"(search run {parent.info.run_id})")
    configs = [_entry(i, c.data, {metric: c.score, "epochs": c.epochs})
               for i, c in enumerate(ranked, 1)]
    return _document(experiment, tracking_uri, parent, metric, mode, configs)


def export_pareto(tracking_uri: str, experiment: str, *,
                  search_run: str | None = None) -> dict[str, Any]:
    """Every Pareto-optimal trial of a multi-objective search (its latest unless
    ``search_run``), best first by the first objective: :func:`export_best`'s document with
    ``objectives`` and one entry per trial on the front, holding each objective's value."""
    check_reachable(tracking_uri, must_exist=True)
    client = MlflowClient(tracking_uri)
    parent = _search_run(client, experiment, search_run)
    objectives = space_from_run(client, parent.info.run_id).objectives()
    if len(objectives) < 2:
        raise TrackingError(f"--pareto: search run {parent.info.run_id} of {experiment!r} has "
                            "one objective; a Pareto front needs search.objectives with two or "
                            "more (use --top instead)")
    first = objectives[0]
    eligible = rank_trials(trial_candidates(client, parent, metric=first["metric"]),
                           mode=first["mode"])
    rows = [{"run": c.data, **{o["metric"]: c.data.data.metrics.get(o["metric"])
                               for o in objectives}} for c in eligible]
    front = front_rows(rows, objectives)
    if not front:
        raise TrackingError(f"experiment {experiment!r} has no finished trial with every "
                            f"objective reported (search run {parent.info.run_id})")
    configs = [_entry(i, r["run"], {o["metric"]: r[o["metric"]] for o in objectives})
               for i, r in enumerate(front, 1)]
    return _document(experiment, tracking_uri, parent, first["metric"], first["mode"], configs,
                     objectives=objectives)


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
