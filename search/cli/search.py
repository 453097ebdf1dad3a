"""``difftune search``: run a search (the demo with no arguments)."""

from __future__ import annotations

import argparse
import logging
import os

from difftune.search.cli.args import check_env_number, integer, number

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
    p.add_argument("--top", type=integer(1), default=10, help="rows of the closing table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.search.run.cluster import local_ray_on_loopback

    if not args.address:
        local_ray_on_loopback()  # before Ray is imported: it reads the setting at import
    from difftune.search.report.console import SearchConsole

    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn to files
    with SearchConsole(verbose=bool(getattr(args, "verbose", False))) as console:
        return _run(args, console)


def _run(args: argparse.Namespace, console) -> int:
    from difftune.search.plan.estimate import data_size, make_plan, refuse_if_over, resolve_budget
    from difftune.search.records import optuna_store
    from difftune.search.records.tracking import default_experiment
    from difftune.search.records.uris import (
        check_reachable,
        check_storage,
        redact,
        refuse_secrets,
        resolve_uri,
    )
    from difftune.search.run.cluster import check_addressable, check_inputs_on_nodes
    from difftune.search.run.tuner import (
        DEFAULT_STORAGE,
        default_model_name,
        ensure_ray,
        plan_resume,
        resume_search,
        run_search,
    )
    from difftune.search.space.spec import load_space, parse_set
    from difftune.trainables.cache.feature_cache import default_root
    from difftune.trainables.data.datasets import check_data
    from difftune.trainables.model.unet import check_model
    from difftune.trainables.progress import DEFAULT_EVERY_S
    from difftune.trainables.trainable import RuntimeOptions

    if args.resume:
        uri = resolve_uri(args.tracking_uri)
        check_reachable(uri, must_exist=True)
        plan = plan_resume(experiment=args.resume, tracking_uri=uri)
        if plan.finished:
            print(f"nothing to resume: the latest search of experiment {args.resume!r} (run "
                  f"{plan.parent}) finished; its runs and champion stay as they are (start a "
                  "new search without --resume)")
            return 0
        # the stores are checked again before anything restarts: the cluster may differ
        ensure_ray(args.address)
        check_addressable(storage_path=plan.storage_path, cache=plan.runtime.cache,
                          tracking_uri=uri, artifact_location=experiment_artifacts(
                              uri, args.resume, None))
        check_inputs_on_nodes({"--checkpoint": plan.space.checkpoint,
                               "--data": plan.space.data})
        result = resume_search(plan, tracking_uri=uri, address=args.address, console=console)
        print_summary(result, top=args.top, model_name=plan.model_name)
        return 0

    space = load_space(
        args.space, model=args.model, checkpoint=args.checkpoint, data=args.data,
        overrides=parse_set(args.pins),
        search_overrides={"trials": args.trials, "seed": args.seed,
                          "gpus_per_trial": args.gpus_per_trial,
                          "cpus_per_trial": args.cpus_per_trial,
                          "max_concurrent": args.max_concurrent},
    )
    check_model(space.model, checkpoint=space.checkpoint)
    check_data(space.data)
    refuse_secrets("--storage", args.storage)
    refuse_secrets("--cache", args.cache)
    refuse_secrets("--artifact-location", args.artifact_location)
    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri)
    check_storage(args.storage)
    check_env_number("DIFFTUNE_MLFLOW_WAIT_S")  # read at the end of the search
    check_env_number("DIFFTUNE_PROGRESS_S")
    study_url = args.optuna_storage or optuna_store.default_storage(uri, args.storage
                                                                    or DEFAULT_STORAGE)
    refuse_secrets("--optuna-storage", study_url)  # Tune's searcher state keeps it
    optuna_store.check_storage(study_url)
    cache = None if args.no_cache else (args.cache or default_root())
    if cache and "://" not in cache:
        cache = os.path.abspath(cache)  # trials run in other working directories
    # the plan first: a search whose cache cannot fit stops here, before anything is written
    budget, source, explicit = resolve_budget(args.cache_budget, space, cache)
    cost = make_plan(space, data_size(space), budget=budget, budget_source=source,
                     cache=cache, cached=cache is not None)
    print(cost.summary(), flush=True)
    refuse_if_over(cost)
    experiment = args.experiment or default_experiment(space)
    artifacts = experiment_artifacts(uri, experiment, args.artifact_location)
    ensure_ray(args.address)
    check_addressable(storage_path=args.storage, cache=cache, tracking_uri=uri,
                      artifact_location=artifacts)
    check_inputs_on_nodes({"--checkpoint": space.checkpoint, "--data": space.data})
    runtime = RuntimeOptions(cache=cache, online=args.no_cache,
                             threads=max(1, int(space.search["cpus_per_trial"])),
                             extract_batch=space.search.get("extract_batch"),
                             progress_s=float(os.environ.get("DIFFTUNE_PROGRESS_S",
                                                             DEFAULT_EVERY_S)),
                             **cache_options(cost, cache, explicit, args.data_hash, space.data))
    extract_first(space, cost, runtime)
    logger.info("search %s: %d trials on %s / %s, tracking %s", space.name,
                space.search["trials"], space.model, space.data, redact(uri))
    model_name = args.model_name or default_model_name(experiment)
    result = run_search(space, experiment=experiment, tracking_uri=uri, runtime=runtime,
                        storage_path=args.storage, address=args.address,
                        model_name=model_name, artifact_location=artifacts,
                        plan=cost.to_dict(), optuna_storage=study_url, console=console)
    print_summary(result, top=args.top, model_name=model_name)
    return 0


def extract_first(space, plan, runtime) -> None:
    """Extract what the plan foresees, sharded over the cluster, before the first trial
    (when there is more than one worker; else trials extract on a miss, as they always do)."""
    from difftune.search.run.extract import cluster_workers, extract_plan, why_not

    if runtime.cache is None or runtime.cache_policy == "none":
        return
    cpu_trials = not float(space.search.get("gpus_per_trial") or 0)
    workers = cluster_workers(gpus=not cpu_trials)
    reason = why_not(plan, space, workers)
    if reason:
        logger.info("extraction: per trial (%s)", reason)
        return
    print(f"extracting the plan's entries first on {workers.describe()}", flush=True)
    # progress lines (images/s, time left) on the search's console, as the trials' are
    counts = extract_plan(space, plan, cache=runtime.cache, workers=workers, progress=False,
                          lines_s=runtime.progress_s,
                          store_pool=runtime.store_pool, extra_blocks=runtime.extra_blocks,
                          budget=runtime.cache_budget, data_files=dict(runtime.data_files),
                          data_hash=runtime.data_hash, batch_size=runtime.extract_batch)
    print(f"extracted {counts['written']} entries ({counts['reused']} already stored, "
          f"{counts['images']} images) in {counts['wall_s']:.1f} s", flush=True)


def experiment_artifacts(uri: str, experiment: str, given: str | None) -> str | None:
    """Where ``experiment``'s artifacts go: its own location if it exists (fixed when it was
    made), else ``given`` or the store's default (:func:`~difftune.search.records.uris.artifact_root`).
    """
    from mlflow.tracking import MlflowClient

    from difftune.search.records.uris import artifact_root, is_database

    if given and "://" not in given:
        given = os.path.abspath(given)
    if not is_database(uri):
        return given  # a server keeps its own; sqlite: beside its file (nothing to check)
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is not None:
        return exp.artifact_location
    return given or artifact_root(uri, experiment)


def cache_options(plan, cache: str | None, explicit: bool, data_hash: str, data: str
                  ) -> dict:
    """The runtime options of the plan's cache policy: what a miss stores, the budget the
    cache keeps (an explicit one; else, when entries must be evicted, the disk the cache is
    on), and the data's fingerprint, computed here once for every trial."""
    from difftune.trainables.cache.policy import usage
    from difftune.trainables.cache.store import Store
    from difftune.trainables.data.datasets import split_files_fingerprints

    if cache is None or plan.policy == "none":
        return {"cache_policy": "none"}
    budget = plan.budget_bytes if explicit else None
    if not explicit and plan.evicts and plan.budget_bytes is not None:
        budget = plan.budget_bytes + usage(Store(cache))[0]  # free space + what is there
    block_set = plan.policy == "block-set"
    logger.info("fingerprinting the data files of %s (%s)", data, data_hash)
    return {"cache_policy": plan.policy, "cache_budget": budget,
            "store_pool": plan.store_pool if block_set else None,
            "extra_blocks": tuple(plan.blocks) if block_set else (),
            "data_hash": data_hash,
            "data_files": tuple(split_files_fingerprints(data, data_hash=data_hash).items())}


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
    if any(row.get("test_top1") is not None for row in result.rows):  # where it was measured
        cols.insert(cols.index("val_top5") + 1, "test_top1")
    failed = result.failed
    failures = ("; failed: " + ", ".join(f"{n} {k}" for k, n in sorted(failed.items()))
                if failed else "")
    print(f"\nbest trials of experiment {result.experiment!r} by {metric} on val "
          f"({len(result.rows)} finished{failures}; epochs: the epochs each trial ran):")
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
    import shlex

    from difftune.search.records.uris import TRACKING_URI_ENV, has_secret, paste_form, server_ui

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
    import shlex

    from difftune.search.records.optuna_store import dashboard_command
    from difftune.search.records.uris import paste_form

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
