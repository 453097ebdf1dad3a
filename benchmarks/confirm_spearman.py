"""Search on a subset, confirm on all the data: the demo search at 0.2 of the labels, whose
top 5 configs are then retrained on all of them (``confirm_top: 5``,
``confirm_label_fraction: 1.0``). Reports the Spearman correlation between the configs'
scores in the search and their confirmed scores, and whether the champion changed.

    python -m benchmarks.confirm_spearman [--trials 20] [--top 5]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("confirm_spearman")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    configure()
    from difftune.search.cli import main as cli
    from difftune.search.run.confirm import spearman
    from difftune.search.space.spec import read_space_file

    _, raw = read_space_file("demo")
    raw["label_fraction"] = args.fraction
    raw["search"].update(trials=args.trials, confirm_top=args.top, confirm_label_fraction=1.0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "space.yaml").write_text(yaml.safe_dump(raw))
        uri = f"sqlite:///{work}/mlflow.db"
        start = time.perf_counter()
        rc = cli(["search", "--space", str(work / "space.yaml"), "--experiment", "confirm",
                  "--tracking-uri", uri, "--storage", str(work / "runs"),
                  "--cache", str(work / "cache")])
        wall = time.perf_counter() - start
        if rc != 0:
            raise SystemExit("the search failed")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("confirm")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parent = next(r for r in runs if r.data.tags.get("difftune.role") == "search")
        confirmed = [r for r in runs if r.data.tags.get("difftune.stage") == "confirm"]
        search = {r.data.tags["difftune.config"]: r for r in runs
                  if r.data.tags.get("difftune.stage") == "search"}
    import json

    def setting(tag: str) -> str:  # a config without its label fraction
        return json.dumps({**json.loads(tag), "label_fraction": None}, sort_keys=True)

    by_setting = {setting(k): r for k, r in search.items()}
    pairs = [(by_setting[setting(r.data.tags["difftune.config"])].data.metrics["val_top1"],
              r.data.metrics["val_top1"]) for r in confirmed]
    pairs.sort(reverse=True)
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
    best_search = max(range(len(pairs)), key=lambda i: pairs[i][0])
    best_confirmed = max(range(len(pairs)), key=lambda i: pairs[i][1])
    record("confirm_spearman", trials=args.trials, search_fraction=args.fraction,
           confirm_top=len(pairs), spearman=rho if rho is not None else "n/a",
           parent_metric=parent.data.metrics.get("confirm_spearman", "n/a"),
           search_scores="/".join(f"{a:.1f}" for a, _ in pairs),
           confirmed_scores="/".join(f"{b:.1f}" for _, b in pairs),
           champion_changed=best_search != best_confirmed, wall_s=wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
