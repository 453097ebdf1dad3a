"""``difftune predict``: classify image files with a search's champion (a label per image)."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/difftune-demo@champion"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a search's champion",
        description="Run the registered champion of a search on image files: each image is "
        "resized to the U-Net's size, noised to the head's step t, passed through the U-Net "
        "the head was trained on, and classified by the head. Prints one line per image: "
        "PATH, LABEL, PROBABILITY (tab-separated).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="an MLflow model URI, or a registered model name (its champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in "
                   "the working directory)")
    p.set_defaults(run=run)


def model_uri(name_or_uri: str) -> str:
    """``NAME`` -> ``models:/NAME@champion``; a URI (``models:/``, ``runs:/``, a path) as is."""
    return name_or_uri if ":" in name_or_uri or "/" in name_or_uri \
        else f"models:/{name_or_uri}@champion"


def run(args: argparse.Namespace) -> int:
    import mlflow

    from difftune.search.records.classifier import predict_images
    from difftune.search.records.uris import check_reachable, resolve_uri
    from difftune.trainables.data.datasets import DataError

    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise DataError(f"image {missing[0]} does not exist"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri, must_exist=True)
    mlflow.set_tracking_uri(uri)
    for path, label, prob in predict_images(model_uri(args.model), args.images):
        print(f"{path}\t{label}\t{prob:.3f}")
    return 0
