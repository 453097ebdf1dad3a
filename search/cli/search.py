"""``difftune search``: run a search (the demo with no arguments)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex

from difftune.search.cli.args import check_env_number, integer, number, rungs
from difftune.search.records.uris import TRACKING_URI_ENV, has_secret, paste_form, server_ui

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="run a hyperparameter search (no arguments: the demo search)",
        description="Search blocks, timesteps, pooling and heads with Ray Tune + Optuna, "
        "recording every trial in MLflow. With no arguments: the demo search (the shipped "
        "demo U-Net on scikit-learn's digits, 20 trials, a few minutes on 2 CPU cores).",
    )
    p.add_argument("--space", default="demo",
                   help="a preset (demo, demo_grid, demo_cost, linear, attention, difformer, "
                   "diffeed) or a YAML file")
    p.add_argument("--model", help="override the space's model: demo, paper256 or a checkpoint path")
    p.add_argument("--checkpoint", help="weights for a preset model (paper256 needs one)")
    p.add_argument("--data", help="override the space's data: digits or an ImageFolder root")
    p.add_argument("--trials", type=integer(1), help="number of trials (default: the space's)")
    p.add_argument("--seed", type=integer(0), help="Optuna sampler seed (default: the space's)")
    p.add_argument("--experiment", help="MLflow experiment name (default: difftune-SPACE-DATA, "
                   "e.g. difftune-linear-imagenet for --space linear --data /data/imagenet; "
                   "the demo search: difftune-demo)")
    p.add_argument("--model-name", help="registered model name for the champion "
                   "(default: the experiment name, prefixed with difftune- unless it has it)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI: http://HOST:PORT of a server, "
                   "a database (postgresql://USER@HOST/DB; its password in $PGPASSWORD, "
                   "~/.pgpass or $MLFLOW_TRACKING_URI) or sqlite:///FILE (default: "
                   "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    p.add_argument("--artifact-location", help="where a new experiment keeps its artifacts "
                   "(the champion model) when --tracking-uri is a database: s3://, gs:// or a "
                   "folder every node reaches (default: ./mlartifacts; a server or a sqlite "
                   "store decides for itself)")
    p.add_argument("--address", help="Ray cluster address to join (default: a local Ray)")
    p.add_argument("--gpus-per-trial", type=number(0, open_low=False),
                   help="GPUs per trial, fractions up to 1 allowed (default: the space's, else "
                   "each head's own share when the cluster has GPUs)")
    p.add_argument("--cpus-per-trial", type=number(0), help="CPUs per trial (default: the space's)")
    p.add_argument("--max-concurrent", type=integer(1),
                   help="trials running at once (default: the space's)")
    p.add_argument("--storage", help="Ray Tune storage path (a shared folder or s3:// on a "
                   "cluster; default: ./difftune_runs)")
    p.add_argument("--cache", help="feature cache folder or URI (default: ./difftune_cache, "
                   "or $DIFFTUNE_CACHE)")
    p.add_argument("--no-cache", action="store_true",
                   help="the paper's behaviour: rerun the U-Net on every batch of every epoch")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="bytes the feature cache may hold, e.g. 500GB, 2TB, 1.5TiB (default: "
                   "the space's cache_budget, else the free space of a local cache; unlimited "
                   "on an object store); a search whose cache cannot fit is refused before it "
                   "starts, naming changes that fit (see difftune plan)")
    p.add_argument("--data-hash", choices=("size", "content"), default="size",
                   help="how the data files are fingerprinted for cache keys, once per search: "
                   "relative paths and sizes, or their bytes too")
    p.add_argument("--set", dest="pins", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a setting of the space, e.g. --set head=mlp --set epochs=3")
    p.add_argument("--resume", metavar="EXPERIMENT",
                   help="continue the latest search of EXPERIMENT after its driver died "
                   "(finished trials are kept, unfinished ones continue)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="where the Optuna study is kept for optuna-dashboard and --resume: a "
                   "SQLAlchemy URL (sqlite:///PATH, postgresql://... without a password: "
                   "libpq reads $PGPASSWORD) or a journal file path (default: optuna.db beside "
                   "a sqlite tracking store, else optuna.journal in --storage; or "
                   "$DIFFTUNE_OPTUNA_STORAGE)")
    p.add_argument("--image-rungs", type=rungs, metavar="FRACTIONS",
                   help="rungs over images, e.g. 0.02,0.1,0.5,1: every trial first trains and "
                   "is scored on that fraction of train and val (at least image_floor images "
                   "per class), and only those ASHA promotes see more images; off: every trial "
                   "reads every image (default: the space's search.image_rungs)")
    p.add_argument("--top", type=integer(1), default=10, help="rows of the closing table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Ray, MLflow and torch only once a search runs (not for `difftune --help`)
    from difftune.search.run.cluster import local_ray_on_loopback

    if not args.address:
        local_ray_on_loopback()  # before Ray is imported: it reads the setting at import
    from difftune.search.report.console import SearchConsole

    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn to files
    with SearchConsole(verbose=bool(getattr(args, "verbose", False))) as console:
        return _run(args, console)


def _run(args: argparse.Namespace, console) -> int:
    from difftune.search.run.preflight import SearchRequest, prepare_search

    if not args.resume:
        check_env_number("DIFFTUNE_MLFLOW_WAIT_S")  # read at the end of the search
        check_env_number("DIFFTUNE_PROGRESS_S")
    request = SearchRequest(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(SearchRequest)})
    ready = prepare_search(request, echo=_echo)
    if ready.nothing_to_resume:
        print(f"nothing to resume: the latest search of experiment {args.resume!r} (run "
              f"{ready.resume.parent}) finished; its runs and champion stay as they are (start "
              "a new search without --resume)")
        return 0
    result = ready.start(console)
    print_summary(result, top=args.top, model_name=ready.model_name)
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


def summary_table(rows: list[dict], cols: list[str]) -> list[str]:
    """Rows as aligned text lines under a header, every cell in full (run ids are 32
    characters: a cut one finds nothing)."""
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    return ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)).rstrip()
            for line in [cols, *cells]]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "-" if v is None else str(v)


def print_summary(result, *, top: int = 10, model_name: str | None = None) -> None:
    metric = result.metric
    cols = ["val_top1", "val_top5", "epochs", "head", "block", "t", "pool", "lr", "run_id"]
    if metric not in cols:
        cols.insert(0, metric)
    if any("rung" in row for row in result.rows):  # rungs over images: where each stopped
        cols[cols.index("epochs")] = "rung"
        cols.insert(cols.index("rung") + 1, "images")
    if any(row.get("test_top1") is not None for row in result.rows):  # where it was measured
        cols.insert(cols.index("val_top5") + 1, "test_top1")
    failed = result.failed
    failures = ("; failed: " + ", ".join(f"{n} {k}" for k, n in sorted(failed.items()))
                if failed else "")
    print(f"\nbest trials of experiment {result.experiment!r} by {metric} on val "
          f"({len(result.rows)} finished{failures}; "
          + ("rung: the rung over images each trial stopped at, images: its train images "
             "there):" if any("rung" in row for row in result.rows)
             else "epochs: the epochs each trial ran):"))
    for line in summary_table(result.rows[:top], cols):
        print(line)
    if result.confirmed:
        print(f"\nconfirmed (the top {len(result.confirmed)} retrained; the champion is the "
              "best confirmed):")
        for row in result.confirmed:
            score = row["confirmed_score"]
            test = (f", test_top1 {row['test_top1']:.2f} (test split)"
                    if row.get("test_top1") is not None else "")
            print(f"  trial {row['search_trial_id']}: {row['search_score']:.4g} in the search, "
                  f"{'-' if score is None else f'{score:.4g}'} confirmed (val){test} "
                  f"(run {row['run_id']})")
    if result.best_run_id:
        test = result.test_metrics
        tested = (f"; test_top1 {test['test_top1']:.2f}, test_top5 {test['test_top5']:.2f} "
                  "(test split, evaluated once)" if "test_top1" in test else "")
        print(f"\nchampion: run {result.best_run_id}, {metric} {result.best_metric:.4g} (val)"
              f"{tested}")
        if result.alias_moved:
            print(f"registered as version {result.model_version} (alias 'champion')")
        else:
            print(f"registered as version {result.model_version}; {result.alias_reason}")
    if result.pareto:
        print_pareto(result.pareto)
    print(follow_up(result.tracking_uri, result.experiment,
                    model_name=model_name if result.best_run_id else None,
                    pareto=bool(result.pareto)))
    print(seeing(result))


def follow_up(tracking_uri: str, experiment: str, *, model_name: str | None = None,
              pareto: bool = False) -> str:
    """The commands to look at a search's results, as a user can paste them: a server's own
    UI address, and a URI with a password spelled as the variable that should hold it."""
    uri = paste_form(tracking_uri)
    ui = server_ui(tracking_uri)
    lines = [f"open the MLflow UI:  {ui}" if ui else
             f"open the MLflow UI:  difftune ui --tracking-uri {uri}",
             f"export the best:     difftune export --experiment {shlex.quote(experiment)} "
             f"--tracking-uri {uri} --out best.yaml"]
    if pareto:
        lines.append(f"export the front:    difftune export --experiment "
                     f"{shlex.quote(experiment)} --tracking-uri {uri} --pareto --out pareto.yaml")
    if model_name:
        lines.append(f"classify images:     difftune predict IMAGE... --model "
                     f"{shlex.quote(f'models:/{model_name}@champion')} --tracking-uri {uri}")
    if has_secret(tracking_uri):
        lines.append(f"(${TRACKING_URI_ENV} must hold the tracking URI with its password, "
                     "which is not printed)")
    return "\n".join(lines)


def print_pareto(front: list[dict]) -> None:
    """The Pareto front of a multi-objective search, best first by the first objective."""
    # torch and MLflow only once a search ran (not for `difftune --help`)
    from difftune.search.records.pareto import TABLE, front_name, short
    from difftune.search.report.gather import FIGURES_DIR

    names = [k for k in front[0] if k not in ("trial_id", "run_id", "config")]
    figure = f"{FIGURES_DIR}/{front_name(names)}.png"
    print(f"\nPareto front ({len(front)} configs; {TABLE} and {figure} on the search run):")
    rows = [{**r, "setting": short(r["config"])} for r in front]
    for line in summary_table(rows, [*names, "setting", "run_id"]):
        print(line)


def seeing(result) -> str:
    """Where a search's figures, UI views, Optuna study and log are, and the commands that
    open them."""
    from difftune.search.records.optuna_store import dashboard_command  # Optuna: not for --help

    rows = []
    if result.figures:
        rows.append((f"figures ({len(result.figures)}, .png + .html)",
                     f"on the search's run {result.parent_run_id[:8]} under figures/: "
                     f"{', '.join(result.figures)}"))
    rows.append(("  into a folder", f"difftune report {shlex.quote(result.experiment)} "
                 f"--tracking-uri {paste_form(result.tracking_uri)} --out figures"))
    if result.experiment_link:
        rows.append(("UI: every search", result.experiment_link))
    if result.trials_link:
        rows.append(("UI: this search's trials", result.trials_link))
    if result.optuna_storage:
        rows.append(("Optuna dashboard", dashboard_command(result.optuna_storage)))
    if result.log_path:
        rows.append(("log of this search", result.log_path))
    return "\n".join(f"{name + ':':<26} {text}" for name, text in rows)
