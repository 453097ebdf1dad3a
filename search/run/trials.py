"""The Ray Tune callback that records every trial as a nested child run of the search's
parent run, from the driver (one writer per store, which suits a sqlite file, and no tracking
credentials on the workers). A child run is found again by its ``difftune.trial_id`` tag, so
a retried or resumed trial continues its own run instead of making a second one.

Every write is a *record* (plain data) in an outbox flushed in order. When the tracking store
does not answer (a connection error, a timeout, HTTP 5xx or 429) the records wait, trials keep
running, and they are sent once it answers again; the waiting records are kept on disk beside
the Tune experiment (``difftune-mlflow-outbox.json``), so a driver killed during an outage
loses none: ``--resume`` sends them. A record the store refuses (HTTP 4xx: no permission, an
invalid value) is dropped with one line, and later records go on. A trial Tune restores as
ended whose run is still open (the driver died between Tune saving its state and sending the
trial's last records) gets its last epoch and its end at the end of the resumed search.

A grid trial (:mod:`difftune.trainables.train.grid`) reports its best head: its run also gets, per
epoch, the metric ``grid_index`` and the tag ``grid_best`` (the best head's grid point, JSON),
and at the end the params ``grid_best.SETTING`` and the table artifact ``grid_results.json``
(every head's point and final val metrics: ``MlflowClient.load_table``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from difftune.search.records.tracking import TAG_CONFIG, TAG_ROLE, TAG_TRIAL
from difftune.search.records.uris import public_uri, redact, redact_text, runtime_uri
from difftune.search.report.gather import trial_label
from difftune.search.report.publish import LiveReport
from difftune.trainables.cache.store import Store
from difftune.trainables.params import decode
from difftune.trainables.train.grid import GRID_BEST, GRID_INDEX, GRID_RESULTS, GRID_SIZE
from difftune.trainables.trainable import FAILURE_KEY

logger = logging.getLogger(__name__)

#: metrics a trial reports each epoch that its run records (step = epoch; with rungs over
#: images, the epochs of its earlier rungs are counted before: :func:`step_of`)
METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "lr", "unet_images", "epoch",
           "gflops", GRID_INDEX, "image_rung", "image_fraction", "rung_images")
#: the table artifact of a grid trial's run
GRID_TABLE = "grid_results.json"
#: the file of waiting records, in the Tune experiment's folder
OUTBOX = "difftune-mlflow-outbox.json"


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an MLflow error stands for (a server's, or MLflow's own mapping of
    its error code; 500 for a request that got no answer), None for other errors."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    sent = re.search(r"failed with error code (\d{3})", str(exc))
    return int(sent[1]) if sent else exc.get_http_status_code()


def store_is_away(exc: BaseException) -> bool:
    """Whether ``exc`` means the tracking store is away for now (wait and send again): a
    connection error or timeout, HTTP 5xx, 408 or 429. Anything else (HTTP 4xx, an invalid
    value) is this record's own fault, and sending it again would fail again."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    import requests

    return isinstance(exc, (OSError, requests.exceptions.RequestException))


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, URIs redacted (MLflow's name the request)."""
    lines = str(exc).strip().splitlines()
    return redact_text(lines[0] if lines else type(exc).__name__)[:300]


class MLflowTrials(tune.Callback):
    """Records every trial as a child run of the search's parent run (see the module).

    :param tracking_uri: the store; kept without its password (:func:`~.uris.public_uri`: this
        object is pickled into Tune's ``tuner.pkl``), which :func:`~.uris.runtime_uri` puts
        back at run time.
    :param outbox_dir: the Tune experiment's folder (local or a pyarrow URI), where records
        that wait for the store are kept; None keeps them in memory only.
    :param tags: put on every trial run (the search stage: ``difftune.stage``).
    :param report: a :class:`~.publish.LiveReport` that redraws the search's figures as
        trials finish.

    A trial's run is named after what it reads (``linear b10 t90 p2``).
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, *, epochs_key: str = "epochs",
                 outbox_dir: str | None = None, tags: dict[str, str] | None = None,
                 report: LiveReport | None = None):
        self.tracking_uri = public_uri(tracking_uri)
        self.parent_run_id = parent_run_id
        self.epochs_key = epochs_key
        self.outbox_dir = outbox_dir
        self.tags = dict(tags or {})  # put on every trial run (e.g. the search stage)
        self.report = report
        self._finished, self._runs = 0, {}
        self._last: dict[str, dict] = {}
        self._logged_steps: dict[str, int] = {}  # run id -> last epoch already in MLflow
        self._outbox: list[dict[str, Any]] = []
        self._ended: set[str] = set()  # trials whose end this driver recorded
        self._loaded = False  # the records a previous driver left on disk are in the outbox
        self._on_disk = False
        self._down_since: float | None = None

    def __getstate__(self) -> dict:  # pickled into Tune's state: the outbox lives on disk
        return {**self.__dict__, "_outbox": [], "_ended": set(), "_loaded": False,
                "_on_disk": False, "_down_since": None}

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(runtime_uri(self.tracking_uri))

    # -- the outbox on disk
    def _store(self) -> Store | None:
        return Store(self.outbox_dir) if self.outbox_dir else None

    def _load(self) -> None:
        self._loaded = True
        store = self._store()
        saved = (store.read_json(OUTBOX) or {}).get("records", []) if store else []
        if saved:
            logger.info("%d MLflow record(s) a previous driver could not send are sent first",
                        len(saved))
            self._outbox[:0] = saved
            self._on_disk = True

    def _save(self) -> None:
        store = self._store()
        if store is None:
            return
        try:
            if self._outbox:
                store.put(OUTBOX, json.dumps({"records": self._outbox}).encode())
                self._on_disk = True
            elif self._on_disk:
                store.delete(OUTBOX)
                self._on_disk = False
        except OSError as exc:
            logger.warning("cannot keep the waiting MLflow records in %s: %s",
                           self.outbox_dir, first_line(exc))

    # -- sending
    def _resolve(self, client: MlflowClient, rec: dict) -> str:
        trial_id = rec["trial"]
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
            config = rec["config"]
            run = client.create_run(parent.info.experiment_id, run_name=rec["name"],
                                    tags={"mlflow.parentRunId": self.parent_run_id,
                                          TAG_TRIAL: trial_id, TAG_ROLE: "trial",
                                          TAG_CONFIG: json.dumps(config, default=str),
                                          **getattr(self, "tags", {})})
            run_id = run.info.run_id
            self._runs[trial_id] = run_id  # the params below may be refused, the run stays
            client.log_batch(run_id, params=[Param(k, str(v)[:6000])
                                             for k, v in sorted(config.items())])
        self._runs[trial_id] = run_id
        return run_id

    def _apply(self, client: MlflowClient, rec: dict) -> None:
        run_id = self._resolve(client, rec)
        metrics = [Metric(*m) for m in rec.get("metrics", [])]
        tags = [RunTag(k, v) for k, v in rec.get("tags", [])]
        op = rec["op"]
        if op == "start":
            client.update_run(run_id, status="RUNNING")
        elif op == "result":
            # a trial restored from an older checkpoint repeats epochs MLflow already has;
            # its node tags still go out
            new = rec["step"] > self._logged_steps.get(run_id, 0)
            if new or tags:
                client.log_batch(run_id, metrics=metrics if new else [], tags=tags)
            if new:
                self._logged_steps[run_id] = rec["step"]
        elif op == "grid":  # a grid trial's last heads: sent before its end, on its own
            client.log_table(run_id, grid_table(rec["table"]), GRID_TABLE)
            client.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"]])
        elif op == "settle":  # a trial that ended under a driver that died before its records
            if client.get_run(run_id).info.status in ("FINISHED", "FAILED", "KILLED"):
                return  # recorded in full: left as it is
            if rec["step"] <= self._logged_steps.get(run_id, 0):
                metrics = [m for m in metrics if m.key.startswith("final_")]
            client.log_batch(run_id, metrics=metrics, tags=tags)
            client.set_terminated(run_id, rec["status"])
        else:  # complete, recover, error
            client.log_batch(run_id, metrics=metrics, tags=tags)
            if op in ("complete", "error"):
                client.set_terminated(run_id, "FINISHED" if op == "complete" else "FAILED")

    def _send(self, trial, op: str, *, step: int = 0, metrics=(), tags=(), **extra) -> None:
        config = decode(trial.config)
        self._outbox.append({
            "trial": trial.trial_id, "config": config, "name": trial_label(config),
            "op": op, "step": step, **extra,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
            "tags": [[t.key, t.value] for t in tags]})
        self.flush()

    def flush(self) -> bool:
        """Send what waits in the outbox, in order; False if the store is still away."""
        if not self._loaded:
            self._load()
        try:
            client = self.client
            while self._outbox:
                rec = self._outbox[0]
                try:
                    self._apply(client, rec)
                except Exception as exc:  # noqa: BLE001 - sorted below: away, or refused
                    if store_is_away(exc):
                        raise
                    status = http_status(exc)
                    logger.error("MLflow refused a record of trial %s (%s%s); it is dropped "
                                 "and later records go on: %s", rec["trial"], rec["op"],
                                 f", HTTP {status} {exc.error_code}" if status else "",
                                 first_line(exc))
                self._outbox.pop(0)
        except Exception as exc:  # noqa: BLE001 - the store is away: keep the records
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning("MLflow at %s is not answering (%s); %d record(s) wait and are "
                               "sent when it is back", redact(self.tracking_uri),
                               first_line(exc), len(self._outbox))
            self._save()
            return False
        if self._on_disk:  # all sent: the file goes
            self._save()
        if self._down_since is not None:
            logger.warning("MLflow is back after %.0f s; waiting records sent",
                           time.monotonic() - self._down_since)
            self._down_since = None
        return True

    # -- Tune's hooks
    def setup(self, **info) -> None:
        self._load()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._send(trial, "start")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FAILURE_KEY):  # its last report: recorded when the trial completes
            self._last.setdefault(trial.trial_id, {}).update(
                {k: result[k] for k in (FAILURE_KEY, "error")})
            return
        step = step_of(result, self._epochs(trial))
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), ts, step) for k in METRICS if k in result]
        previous = self._last.get(trial.trial_id, {})
        tags = []
        if result.get("node_id") != previous.get("node_id") or not previous:
            # the node the trial runs on (again, when a retry moved it to another node)
            tags = [RunTag("node_id", str(result.get("node_id", ""))),
                    RunTag("node_ip", str(result.get("node_ip", ""))),
                    RunTag("hostname", str(result.get("hostname", "")))]
        if GRID_BEST in result and result[GRID_BEST] != previous.get(GRID_BEST):
            tags += [RunTag(GRID_BEST, str(result[GRID_BEST])),
                     RunTag(GRID_SIZE, str(result.get(GRID_SIZE, "")))]
        self._last[trial.trial_id] = dict(result)
        self._send(trial, "result", step=step, metrics=metrics, tags=tags)

    def _finals(self, trial) -> tuple[int, list[Metric], list[RunTag]]:
        last = self._last.get(trial.trial_id) or trial.last_result or {}
        epochs = self._epochs(trial)
        done = step_of(last, epochs)
        ts = int(time.time() * 1000)
        finals = [Metric(f"final_{k}", float(last[k]), ts, done) for k in ("val_top1", "val_top5")
                  if k in last]
        # stopped before its last epoch, or before the last rung over images
        stopped = bool(epochs and last.get("epoch", 0) < epochs) or last.get("image_fraction", 1) < 1
        return done, finals, [RunTag("early_stopped", str(stopped).lower())]

    def _epochs(self, trial) -> int:  # a trial's epochs (per rung over images)
        return int(decode(trial.config).get(self.epochs_key, 0) or 0)

    def _grid(self, trial, last: dict) -> None:
        """A grid trial's table of heads and best point (a record of its own: a store that
        refuses it, e.g. params a resumed run holds with other values, does not keep the
        trial's end from being recorded)."""
        if GRID_RESULTS not in last:
            return
        point = json.loads(last.get(GRID_BEST) or "{}")
        params = [[f"{GRID_BEST}.{k}", json.dumps(v) if isinstance(v, list) else str(v)]
                  for k, v in point.items()]
        self._send(trial, "grid", table=json.loads(last[GRID_RESULTS]), params=params)

    def _failure_tags(self, trial) -> list[RunTag]:
        """The tags of a trial that ended with a failure report (a failure a retry would
        repeat: diverged, config, data), else none."""
        last = self._last.get(trial.trial_id) or trial.last_result or {}
        if not last.get(FAILURE_KEY):
            return []
        return [RunTag("failure", str(last[FAILURE_KEY])),
                RunTag("error", f"{last[FAILURE_KEY]}: {last.get('error', '')}"[:5000]),
                RunTag("failures", "1")]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        failure = self._failure_tags(trial)
        if failure:  # ended at once, not retried: its run is FAILED
            self._send(trial, "error", tags=failure)
            return
        _, finals, tags = self._finals(trial)
        self._grid(trial, self._last.get(trial.trial_id) or trial.last_result or {})
        self._send(trial, "complete", metrics=finals, tags=tags)
        self._finished += 1
        if self.report is not None:
            self.report.poke(self._finished)

    def on_trial_recover(self, iteration, trials, trial, **info):
        tags = [RunTag("last_failure", _error_line(trial)),
                RunTag("failures", str(trial.num_failures))]
        failed_on = self._last.get(trial.trial_id, {}).get("node_id")
        if failed_on:
            tags.append(RunTag("failed_node_id", str(failed_on)))
        self._send(trial, "recover", tags=tags)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended.add(trial.trial_id)
        tags = [RunTag("failure", "error"), RunTag("error", _error_line(trial)),
                RunTag("failures", str(trial.num_failures))]
        self._send(trial, "error", tags=tags)

    def _settle(self, trial) -> None:
        """A trial Tune restored as ended: a driver killed between Tune saving its state and
        sending the trial's last records left its run open. Its last epoch and end are sent
        (the run is left as it is if it was recorded in full)."""
        last = trial.last_result or {}
        done, finals, tags = self._finals(trial)
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(last[k]), ts, done) for k in METRICS if k in last]
        failure = self._failure_tags(trial)
        if trial.status == "ERROR":
            tags = [RunTag("failure", "error"), RunTag("error", _error_line(trial))]
        elif failure:
            metrics, finals, tags = [], [], failure
        else:
            self._grid(trial, last)
        self._send(trial, "settle", step=done, metrics=metrics + finals, tags=tags,
                   status="FAILED" if trial.status == "ERROR" or failure else "FINISHED")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self._ended:
                self._settle(trial)
        deadline = time.monotonic() + float(os.environ.get("DIFFTUNE_MLFLOW_WAIT_S", "300"))
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(5)
        if self._outbox:
            where = f"; they are kept in {self.outbox_dir}/{OUTBOX} and sent by --resume" \
                if self._on_disk else ""
            logger.error("MLflow at %s did not come back: %d trial record(s) were not "
                         "written%s", redact(self.tracking_uri), len(self._outbox), where)


def step_of(result: dict, epochs: int) -> int:
    """A report's MLflow step: its epoch after ``epochs`` per earlier rung (never repeats)."""
    epoch = int(result.get("epoch", result.get("training_iteration", 0)))
    return epoch + int(result.get("image_rung") or 0) * int(epochs)


def grid_table(rows: list[dict]) -> dict[str, list]:
    """A grid trial's per-head rows as columns (``log_table``'s format), list values as JSON
    text (``hidden: [256, 256]``)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return {c: [json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c)
                for r in rows] for c in cols}


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text().strip().splitlines()
        return text[-1][:500] if text else "unknown error"
    except OSError:
        return "unknown error (no error file)"
