"""``difftune train``: retrain and evaluate an exported config (same seed, same numbers)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from difftune.search.cli.args import integer

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="retrain and evaluate a config exported by `difftune export`",
        description="Retrain the head of an exported config on its features, report val "
        "top-1/top-5 per epoch (the selection split; with the same seed it reproduces the "
        "trial), then evaluate the trained head once on the test split.",
    )
    p.add_argument("file", help="YAML written by difftune export")
    p.add_argument("--rank", type=integer(1), default=1,
                   help="which config of the file, by the search's rule for the best trial")
    p.add_argument("--cache", help="feature cache to use (default: the search's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--save", help="folder to save the trained head checkpoint in")
    p.set_defaults(run=run)


def load_export(path: str, rank: int):
    from difftune.trainables.config import TrialConfig
    from difftune.trainables.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and "configs" in data:
        entries = ranked_entries(data)
        if not 1 <= rank <= len(entries):
            raise UserError(f"--rank {rank} is out of range; {path} has ranks 1..{len(entries)}")
        entry = entries[rank - 1]
        return TrialConfig.from_dict(entry["config"]), data.get("runtime") or {}, entry
    if isinstance(data, dict):  # a bare trial config
        return TrialConfig.from_dict(data), {}, {}
    raise UserError(f"config file {path} must be a mapping (the output of difftune export)")


def ranked_entries(data: dict) -> list[dict]:
    """The configs of an export file, best first by :mod:`difftune.search.records.best`'s rule (score:
    the search's metric at the last epoch; ties: fewer epochs, then file order); a file whose
    entries lack scores keeps its order."""
    from difftune.search.records.best import Candidate, rank_trials

    entries = list(data["configs"])
    metric, mode = data.get("metric", "val_top1"), data.get("mode", "max")
    cands = [Candidate(key=str(i), order=i, score=e.get(metric), epochs=int(e.get("epochs") or 0),
                       data=e) for i, e in enumerate(entries)]
    ranked = rank_trials(cands, mode=mode)
    return [c.data for c in ranked] if len(ranked) == len(entries) else entries


def run(args: argparse.Namespace) -> int:
    import torch

    from difftune.trainables.heads.checkpoint import save_head
    from difftune.trainables.pipeline import evaluate_on, run_trial
    from difftune.trainables.trainable import RuntimeOptions, make_source

    cfg, runtime_dict, entry = load_export(args.file, args.rank)
    if args.cache:
        runtime_dict = {**runtime_dict, "cache": args.cache}
    runtime = RuntimeOptions.from_dict(runtime_dict)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    holder: dict = {}

    def on_epoch(epoch, metrics, head, opt, sched):
        logger.info("epoch %d: train_loss %.4f val_top1 %.2f val_top5 %.2f", epoch,
                    metrics["train_loss"], metrics["val_top1"], metrics["val_top5"])

    source = make_source(runtime, args.device)
    head, history = run_trial(cfg, source=source, device=args.device, on_epoch=on_epoch,
                              on_data=holder.update)
    final = history[-1]
    test = evaluate_on(head, cfg, "test", source=source, device=args.device)
    if args.save:
        save_head(args.save, head, cfg, epoch=final["epoch"],
                  shapes=holder.get("shapes", {}), num_classes=holder.get("num_classes", 0))
    msg = (f"val_top1 {final['val_top1']:.2f}  val_top5 {final['val_top5']:.2f}  (val split)  "
           f"test_top1 {test['test_top1']:.2f}  test_top5 {test['test_top5']:.2f}  (test split)")
    if entry.get("val_top1") is not None:
        msg += f"  recorded in the search: val_top1 {entry['val_top1']:.2f}"
    print(msg)
    return 0
