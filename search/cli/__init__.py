"""The ``difftune`` command line: thin entry points over :mod:`difftune.search` and
:mod:`difftune.trainables`.

Every subcommand lives in its own module with ``add_parser(subparsers)`` and a ``run(args)``;
this module only wires them and turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from difftune import __version__
from difftune.search.cli.args import Parser
from difftune.trainables.errors import SearchFailed, UserError

logger = logging.getLogger("difftune")

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = (
    "difftune.search.cli.search",
    "difftune.search.cli.plan",
    "difftune.search.cli.report",
    "difftune.search.cli.export",
    "difftune.search.cli.train",
    "difftune.search.cli.predict",
    "difftune.search.cli.ui",
    "difftune.search.cli.extract",
    "difftune.search.cli.cache",
    "difftune.search.cli.model",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="difftune",
        description=(
            "Search which frozen guided-diffusion U-Net features (block, timestep, pooling) "
            "and which head on top of them classify a dataset best. Run `difftune search` "
            "with no arguments for the demo search."
        ),
    )
    parser.add_argument("--version", action="version", version=f"difftune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; a search also shows Ray Tune's, MLflow's and "
                        "Optuna's own console output (by default kept in its log file)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``difftune ARGV``; returns the exit code (0, 2 for a user error, 130 interrupted)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's download bars (logging the champion checks its input example) are not progress
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # guided-diffusion's own deprecations (torch.cuda.amp.custom_fwd) are not the user's
    warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "matplotlib"):  # INFO lines (db migrations) not for users
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"difftune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SearchFailed as exc:
        print(f"difftune {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"difftune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
