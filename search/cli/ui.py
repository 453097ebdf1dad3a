"""``difftune ui``: the MLflow UI for a tracking store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from difftune.search.cli.args import integer

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the search's tracking store",
        description="Start `mlflow ui` on the tracking store (a sqlite file or a database; "
        "default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory), "
        "bound to 127.0.0.1 unless --host says otherwise, and print the link to each difftune "
        "experiment's runs (every search, trials nested, key columns shown). An MLflow server "
        "serves its own UI.",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking store: a sqlite file or a database "
                   "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
                   "directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=integer(1, 65535), default=5000, help="port to bind")
    p.set_defaults(run=run)


def ui_command(host: str, port: int) -> list[str]:
    """``mlflow ui`` on ``host:port``; the store comes from ``$MLFLOW_BACKEND_STORE_URI``,
    not from the command line, where every user of the machine could read a password."""
    mlflow = shutil.which("mlflow")
    base = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    return [*base, "ui", "--host", host, "--port", str(port)]


def search_links(uri: str, address: str) -> list[tuple[str, str]]:
    """``(experiment, link)`` to each difftune experiment's runs view, as a search prints
    them (:func:`~difftune.search.report.ui_view.experiment_links`); none when the store
    cannot be read yet (``mlflow ui`` says why)."""
    from mlflow.tracking import MlflowClient

    from difftune.search.records.uris import (
        TrackingError,
        check_database,
        is_database,
        redact_text,
    )
    from difftune.search.report.ui_view import experiment_links

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return []  # reading must not create the store: mlflow ui does
    if is_database(uri):  # one connection with a timeout: MLflow retries one for minutes
        try:
            check_database(uri, timeout=3.0)
        except TrackingError as exc:
            logger.warning("no links to the searches: %s", exc)
            return []
    try:
        return experiment_links(MlflowClient(uri), address)
    except Exception as exc:  # the links are a nicety; the UI shows every experiment
        logger.warning("no links to the searches: %s",
                       redact_text(str(exc).strip().splitlines()[0]) if str(exc).strip()
                       else type(exc).__name__)
        return []


def run(args: argparse.Namespace) -> int:
    from difftune.search.records.uris import TrackingError, redact, resolve_uri, server_ui

    uri = resolve_uri(args.tracking_uri)
    if server_ui(uri):
        raise TrackingError(f"--tracking-uri {redact(uri)} is an MLflow server, which serves "
                            f"its own UI: open {server_ui(uri)} (difftune ui serves a sqlite or "
                            "database store)")
    cmd = ui_command(args.host, args.port)
    address = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {address}  (mlflow ui on {redact(uri)})", flush=True)
    for name, link in search_links(uri, address):
        print(f"  {name}: {link}", flush=True)
    os.execve(cmd[0], cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})
    return 0  # not reached
