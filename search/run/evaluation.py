"""The test split, read once: after a search has chosen (the champion, and every config the
confirm stage keeps), each chosen head is evaluated on ``test`` as a Ray task with the
resources of a trial of its head (so on a GPU node when trials get GPUs), and its
``test_top1`` / ``test_top5`` / ``test_loss`` are logged on its own run. Nothing of the test
split ever reaches a trial, ASHA, Optuna or the choice of the champion.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from difftune.search.run.cluster import cluster_gpus, trial_resources
from difftune.trainables.trainable import (
    HEAD_FILE,
    META_FILE,
    RuntimeOptions,
    evaluate_checkpoint,
)

logger = logging.getLogger(__name__)

#: what a test evaluation logs
TEST_METRICS = ("test_top1", "test_top5", "test_loss")
#: what a test evaluation reads of a checkpoint
HEAD_FILES = (HEAD_FILE, META_FILE)


def _resources(search: Mapping[str, Any], config: dict[str, Any]) -> dict[str, float]:
    res = trial_resources(search, gpus_available=cluster_gpus())
    res = res(config) if callable(res) else res
    return {"num_cpus": float(res.get("cpu", 1.0)), "num_gpus": float(res.get("gpu", 0.0))}


def _read(checkpoint: Any) -> dict[str, bytes]:
    """The head files of a checkpoint (a ``tune.Checkpoint`` or a folder), read here: the
    driver reaches Tune's storage with its own credentials; the task gets the bytes. A grid
    trial's checkpoint holds its best head as a plain head: that is what is read (its
    ``grid.pt``, every head and the optimizer, is not)."""
    if isinstance(checkpoint, (str, Path)):
        return {n: (Path(checkpoint) / n).read_bytes() for n in HEAD_FILES}
    with checkpoint.as_directory() as d:
        return {n: (Path(d) / n).read_bytes() for n in HEAD_FILES}


def _evaluate_files(files: dict[str, bytes], runtime: dict[str, Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return evaluate_checkpoint(d, runtime, "test")


def evaluate_on_test(checkpoints: Sequence[tuple[Any, dict[str, Any]]], *,
                     runtime: RuntimeOptions, search: Mapping[str, Any]
                     ) -> list[dict[str, float]]:
    """Evaluate head checkpoints on the test split, each once, concurrently as Ray tasks.

    :param checkpoints: ``(tune.Checkpoint or folder, the trial's flat config)`` pairs.
    :param search: the space's search settings (for the per-trial resources).
    :return: per checkpoint, ``{test_top1, test_top5, test_loss}``.
    """
    task = ray.remote(_evaluate_files)
    refs = [task.options(**_resources(search, config)).remote(_read(ckpt), runtime.to_dict())
            for ckpt, config in checkpoints]
    return ray.get(refs)


def log_test_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> None:
    """Put ``test_*`` metrics on a run (step 0: measured once, after the search)."""
    import time

    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()
                                      if k in TEST_METRICS])
