"""The Ray Tune callback that records every trial as a nested child run of the search's
parent run, from the driver (one writer per store, which suits a sqlite file, and no tracking
credentials on the workers). A child run is found again by its ``difftune.trial_id`` tag, so
a retried or resumed trial continues its own run instead of making a second one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from difftune.search.tracking import TAG_CONFIG, TAG_ROLE, TAG_TRIAL
from difftune.search.uris import redact
from difftune.trainables.params import decode

logger = logging.getLogger(__name__)

#: metrics a trial reports each epoch that its run records (step = epoch)
METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "lr", "unet_images", "epoch")


class MLflowTrials(tune.Callback):
    """Records every trial as a child run of the search's parent run.

    Every write goes through an outbox flushed in order: when the tracking server is away,
    the writes wait (trials keep running) and reach MLflow once it answers again; at the end
    of the search the callback waits up to ``DIFFTUNE_MLFLOW_WAIT_S`` (default 300) seconds
    for it.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, *, epochs_key: str = "epochs"):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.epochs_key = epochs_key
        self._runs: dict[str, str] = {}
        self._last: dict[str, dict] = {}
        self._logged_steps: dict[str, int] = {}  # run id -> last epoch already in MLflow
        self._outbox: list[tuple[str, dict, str, Callable[[MlflowClient, str], None]]] = []
        self._down_since: float | None = None

    def __getstate__(self) -> dict:  # pickled into Tune's state: no pending closures
        state = dict(self.__dict__)
        state["_outbox"] = []
        return state

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def _resolve(self, client: MlflowClient, trial_id: str, config: dict, name: str) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        parent = client.get_run(self.parent_run_id)
        found = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{TAG_TRIAL}` = '{trial_id}' and "
                          f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=1)
        if found:  # a retried or resumed trial continues its own run
            run_id = found[0].info.run_id
            history = client.get_metric_history(run_id, "val_top1")
            self._logged_steps[run_id] = max((m.step for m in history), default=0)
        else:
            run = client.create_run(parent.info.experiment_id, run_name=name,
                                    tags={"mlflow.parentRunId": self.parent_run_id,
                                          TAG_TRIAL: trial_id, TAG_ROLE: "trial",
                                          TAG_CONFIG: json.dumps(config, default=str)})
            run_id = run.info.run_id
            client.log_batch(run_id, params=[Param(k, str(v)[:6000])
                                             for k, v in sorted(config.items())])
        self._runs[trial_id] = run_id
        return run_id

    def _send(self, trial, fn: Callable[[MlflowClient, str], None]) -> None:
        self._outbox.append((trial.trial_id, decode(trial.config), str(trial), fn))
        self.flush()

    def flush(self) -> bool:
        """Send what waits in the outbox, in order; False if the server is still away."""
        client = self.client
        while self._outbox:
            trial_id, config, name, fn = self._outbox[0]
            try:
                fn(client, self._resolve(client, trial_id, config, name))
            except Exception as exc:  # server away: keep the record, try again later
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.warning("MLflow at %s is not answering (%s); %d record(s) wait and "
                                   "are sent when it is back", redact(self.tracking_uri),
                                   str(exc).splitlines()[0][:200], len(self._outbox))
                return False
            self._outbox.pop(0)
        if self._down_since is not None:
            logger.warning("MLflow is back after %.0f s; waiting records sent",
                           time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def on_trial_start(self, iteration, trials, trial, **info):
        self._send(trial, lambda c, run_id: c.update_run(run_id, status="RUNNING"))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), ts, step) for k in METRICS if k in result]
        previous = self._last.get(trial.trial_id, {})
        tags = []
        if result.get("node_id") != previous.get("node_id") or not previous:
            # the node the trial runs on (again, when a retry moved it to another node)
            tags = [RunTag("node_id", str(result.get("node_id", ""))),
                    RunTag("node_ip", str(result.get("node_ip", ""))),
                    RunTag("hostname", str(result.get("hostname", "")))]
        self._last[trial.trial_id] = dict(result)

        def send(c: MlflowClient, run_id: str) -> None:
            # a trial restored from an older checkpoint repeats epochs MLflow already has;
            # its node tags still go out
            new = step > self._logged_steps.get(run_id, 0)
            if new or tags:
                c.log_batch(run_id, metrics=metrics if new else [], tags=tags)
            if new:
                self._logged_steps[run_id] = step

        self._send(trial, send)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self._last.get(trial.trial_id) or trial.last_result or {}
        epochs = int(decode(trial.config).get(self.epochs_key, 0) or 0)
        done = int(last.get("epoch", 0))
        ts = int(time.time() * 1000)
        finals = [Metric(f"final_{k}", float(last[k]), ts, done) for k in ("val_top1", "val_top5")
                  if k in last]
        tags = [RunTag("early_stopped", str(bool(epochs and done < epochs)).lower())]

        def send(c: MlflowClient, run_id: str) -> None:
            c.log_batch(run_id, metrics=finals, tags=tags)
            c.set_terminated(run_id, "FINISHED")

        self._send(trial, send)

    def on_trial_recover(self, iteration, trials, trial, **info):
        tags = [RunTag("last_failure", _error_line(trial)),
                RunTag("failures", str(trial.num_failures))]
        failed_on = self._last.get(trial.trial_id, {}).get("node_id")
        if failed_on:
            tags.append(RunTag("failed_node_id", str(failed_on)))
        self._send(trial, lambda c, run_id: c.log_batch(run_id, tags=tags))

    def on_trial_error(self, iteration, trials, trial, **info):
        tags = [RunTag("error", _error_line(trial)), RunTag("failures", str(trial.num_failures))]

        def send(c: MlflowClient, run_id: str) -> None:
            c.log_batch(run_id, tags=tags)
            c.set_terminated(run_id, "FAILED")

        self._send(trial, send)

    def on_experiment_end(self, trials, **info):
        deadline = time.monotonic() + float(os.environ.get("DIFFTUNE_MLFLOW_WAIT_S", "300"))
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(5)
        if self._outbox:
            logger.error("MLflow at %s did not come back: %d trial record(s) were not written",
                         redact(self.tracking_uri), len(self._outbox))


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1][:500] if text else "unknown error"
    except OSError:
        return "unknown error (no error file)"
