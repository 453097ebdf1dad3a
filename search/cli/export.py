"""``difftune export``: the best trial configs of an experiment, read from MLflow, as YAML
that ``difftune train`` reruns (so it works from any machine that reaches the tracking
server)."""

from __future__ import annotations

import argparse
import logging
import os

from difftune.search.cli.args import integer

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the best trial config(s) of an experiment to YAML",
        description="Read the finished trials of the latest search of EXPERIMENT from MLflow "
        "and write the top K configs, with everything needed to rerun them, to FILE.yaml "
        "(`difftune train FILE.yaml --rank N` reruns one). With --pareto: every config on the "
        "Pareto front of a search with several objectives (search.objectives), best first by "
        "the first objective. A grid trial's config is that of its best head.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the "
                   "working directory)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--top", type=integer(1), default=1, help="how many configs")
    which.add_argument("--pareto", action="store_true",
                       help="every Pareto-optimal config of a multi-objective search")
    p.add_argument("--search-run", help="parent run id of the search (default: the latest)")
    p.add_argument("--out", required=True, help="output YAML file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.search.records.export import export_best, export_pareto, write_yaml_atomic
    from difftune.search.records.uris import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    if args.pareto:
        # the objectives come from the search's space.yaml: no progress bar for one small file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        data = export_pareto(uri, args.experiment, search_run=args.search_run)
        write_yaml_atomic(args.out, data)
        names = [o["metric"] for o in data["objectives"]]
        print(f"wrote the {len(data['configs'])} Pareto-optimal config(s) to {args.out}:")
        for c in data["configs"]:
            values = "  ".join(f"{m} {c[m]:.4g}" for m in names)
            print(f"  rank {c['rank']}: run {c['run_id']}  {values}")
        return 0
    data = export_best(uri, args.experiment, top=args.top, search_run=args.search_run)
    write_yaml_atomic(args.out, data)
    best = data["configs"][0]
    print(f"wrote {len(data['configs'])} config(s) to {args.out}; best: run {best['run_id']} "
          f"{data['metric']} {best[data['metric']]:.4g}")
    return 0
