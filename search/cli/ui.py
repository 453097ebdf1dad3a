"""``difftune ui``: the MLflow UI for a tracking store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from difftune.search.cli.args import integer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the search's tracking store",
        description="Start `mlflow ui` on the tracking store (a sqlite file or a database; "
        "default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory), "
        "bound to 127.0.0.1 unless --host says otherwise. An MLflow server serves its own UI.",
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


def run(args: argparse.Namespace) -> int:
    from difftune.search.records.uris import TrackingError, redact, resolve_uri, server_ui

    uri = resolve_uri(args.tracking_uri)
    if server_ui(uri):
        raise TrackingError(f"--tracking-uri {redact(uri)} is an MLflow server, which serves "
                            f"its own UI: open {server_ui(uri)} (difftune ui serves a sqlite or "
                            "database store)")
    cmd = ui_command(args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port}  (mlflow ui on {redact(uri)})",
          flush=True)
    os.execve(cmd[0], cmd, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})
    return 0  # not reached
