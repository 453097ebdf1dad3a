"""``difftune report``: a search's figures and summary, drawn from its MLflow runs into a
folder, for any search: finished, running or killed."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from difftune.search.records.uris import check_reachable, resolve_uri

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="draw a search's figures (block x timestep, slices, importances, ...) into a folder",
        description="Draw the figures of the latest search of EXPERIMENT (or of --run) from its "
        "MLflow runs: best score per block x timestep, pooling and learning-rate slices, "
        "fANOVA importances, optimization history, score against extraction GFLOPs with the "
        "Pareto front, learning curves of the top trials. Each figure is written as NAME.png "
        "and NAME.html, with report.md (the summary the search's run shows). Works on a "
        "search that is still running or was killed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="MLflow experiment of the search")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db "
                   "in the working directory)")
    p.add_argument("--out", help="folder to write the figures to (default: "
                   "difftune_report/EXPERIMENT)")
    p.add_argument("--run", dest="run_id", metavar="RUN_ID", help="the search's parent run (default: the "
                   "experiment's latest search)")
    p.add_argument("--update-run", action="store_true",
                   help="also put the figures and the summary on the search's parent run "
                   "(what a search does as it runs; useful for a killed one)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")  # before matplotlib is imported
    # MLflow, torch and matplotlib only once a report is drawn (not for `difftune --help`)
    from mlflow.tracking import MlflowClient

    from difftune.search.report.description import note
    from difftune.search.report.draw import write_figures
    from difftune.search.report.gather import find_search, gather
    from difftune.search.report.probe_figure import draw_probe_map, read_probe_map
    from difftune.search.report.publish import publish

    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri, must_exist=True)
    client = MlflowClient(uri)
    parent = find_search(client, args.experiment, args.run_id)
    out = Path(args.out or Path("difftune_report") / args.experiment)
    data = gather(client, parent.info.run_id)
    names = write_figures(data, out_dir=out)
    pmap = read_probe_map(client, parent.info.run_id)  # the probe rung's map, when it ran
    if pmap is not None:
        import matplotlib.pyplot as plt

        fig = draw_probe_map(pmap)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "probe_map.png", dpi=120)
        plt.close(fig)
    (out / "report.md").write_text(note(data, names))
    if args.update_run:
        publish(client, parent.info.run_id)
    done = sum(t.finished for t in data.trials)
    print(f"search {data.parent_name} ({data.parent_status.lower()}, {done} of "
          f"{len(data.trials)} trials finished): {len(names)} figures in {out}/")
    for name in names:
        print(f"  {out / name}.png  (.html to explore)")
    if pmap is not None:
        print(f"  {out / 'probe_map.png'}  (the probe rung's block x timestep map)")
    print(f"  {out / 'report.md'}")
    return 0
