"""``difftune ui``: the MLflow UI for a tracking store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from difftune.search.argtypes import integer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the search's tracking store",
        description="Start `mlflow ui` on the tracking store (default sqlite:///mlflow.db in "
        "the working directory), bound to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the "
                   "working directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=integer(1, 65535), default=5000, help="port to bind")
    p.set_defaults(run=run)


def ui_command(uri: str, host: str, port: int) -> list[str]:
    mlflow = shutil.which("mlflow")
    base = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    return [*base, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def run(args: argparse.Namespace) -> int:
    from difftune.search.uris import resolve_uri

    cmd = ui_command(resolve_uri(args.tracking_uri), args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port}  ({' '.join(cmd)})", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached
