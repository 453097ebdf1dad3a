"""``difftune export``: the best trial configs of an experiment, read from MLflow, as YAML
that ``difftune train`` reruns (so it works from any machine that reaches the tracking
server)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the best trial config(s) of an experiment to YAML",
        description="Read the finished trials of the latest search of EXPERIMENT from MLflow "
        "and write the top K configs, with everything needed to rerun them, to FILE.yaml.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="default: sqlite:///mlflow.db in the working directory")
    p.add_argument("--top", type=int, default=1, help="how many configs")
    p.add_argument("--search-run", help="parent run id of the search (default: the latest)")
    p.add_argument("--out", required=True, help="output YAML file")
    p.set_defaults(run=run)


def export_best(tracking_uri: str, experiment: str, *, top: int = 1,
                search_run: str | None = None) -> dict[str, Any]:
    """The top ``top`` finished trials of a search, best first."""
    from mlflow.tracking import MlflowClient

    from search.tracking import (
        TAG_CONFIG,
        TAG_RUNTIME,
        TrackingError,
        check_reachable,
        latest_search_run,
        redact,
    )
    from trainables.config import TrialConfig

    check_reachable(tracking_uri, must_exist=True)
    client = MlflowClient(tracking_uri)
    if search_run is None:
        parent = latest_search_run(client, experiment, what="--experiment")
    else:
        parent = client.get_run(search_run)
    exp_id = parent.info.experiment_id
    trials = client.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                      "attributes.status = 'FINISHED'",
        order_by=["metrics.val_top1 DESC"], max_results=max(top, 1) * 4)
    trials = [r for r in trials if "val_top1" in r.data.metrics][:top]
    if not trials:
        raise TrackingError(f"experiment {experiment!r} has no finished trial to export "
                            f"(search run {parent.info.run_id})")
    runtime = json.loads(parent.data.tags.get(TAG_RUNTIME, "{}"))
    configs = []
    for rank, r in enumerate(trials, 1):
        cfg = TrialConfig.from_dict(json.loads(r.data.tags[TAG_CONFIG])).to_dict()
        configs.append({"rank": rank, "run_id": r.info.run_id,
                        "val_top1": r.data.metrics["val_top1"],
                        "val_top5": r.data.metrics.get("val_top5"), "config": cfg})
    return {"experiment": experiment, "tracking_uri": redact(tracking_uri),
            "search_run_id": parent.info.run_id, "runtime": runtime, "configs": configs}


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


def run(args: argparse.Namespace) -> int:
    from search.tracking import resolve_uri

    data = export_best(resolve_uri(args.tracking_uri), args.experiment, top=args.top,
                       search_run=args.search_run)
    write_yaml_atomic(args.out, data)
    best = data["configs"][0]
    print(f"wrote {len(data['configs'])} config(s) to {args.out}; best: run {best['run_id']} "
          f"val_top1 {best['val_top1']:.2f}")
    return 0
