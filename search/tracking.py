"""MLflow: one parent run per search, one nested child run per trial, the champion head.

Trials are recorded from the driver by a Ray Tune callback (one writer per store, which
suits a sqlite file, and no tracking credentials on the workers). A child run is found again
by its ``difftune.trial_id`` tag, so a retried or resumed trial continues its own run
instead of making a second one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from trainables.errors import UserError
from trainables.trainable import decode_config

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_ROLE = "difftune.role"
TAG_TRIAL = "difftune.trial_id"
TAG_CONFIG = "difftune.config"
TAG_RUNTIME = "difftune.runtime"
METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "lr", "unet_images")


class TrackingError(UserError):
    """The tracking server cannot be reached, or holds nothing to export."""


_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "signature")


def redact(uri: str | None) -> str | None:
    """``uri`` with credentials masked (``user:pass@`` and query values such as
    ``secret_key=``), for anything printed or recorded. Credentials belong in the
    environment (AWS_*, MLFLOW_TRACKING_TOKEN, ...), where nothing here reads them out."""
    if not uri or "://" not in uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [k for k, _ in pairs if any(w in k.lower() for w in _SECRET_WORDS)]
    if "@" not in parts.netloc and not secret:
        return uri  # nothing to hide: keep it exactly as given
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if k in secret else v) for k, v in pairs], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: ``--tracking-uri``, else ``sqlite:///mlflow.db`` in the working
    directory (as an absolute path, so Ray workers and later commands agree)."""
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def check_reachable(uri: str, *, timeout: float = 5.0, must_exist: bool = False) -> None:
    """Fail with one clear line if a remote tracking server does not answer (or, with
    ``must_exist``, if a sqlite store is not there: reading must not create one)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise TrackingError(f"--tracking-uri {redact(uri)} is unreachable ({exc.strerror or exc}); "
                                "start the server or pass a reachable URI") from None
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingError(f"--tracking-uri {uri}: folder {db.parent} does not exist")
        if must_exist and not db.is_file():
            raise TrackingError(f"--tracking-uri {uri}: there is no MLflow store at {db} "
                                "(run a search first or pass the store's URI)")


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file (``mlartifacts/``), not into
    whatever the working directory is; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment
        return folder.as_uri()
    return None


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("difftune")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def start_parent_run(client: MlflowClient, experiment: str, *, space_dict: dict[str, Any],
                     runtime: dict[str, Any], tune_path: str, model_name: str) -> str:
    """Create the search's parent run with the resolved space; returns its run id."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_root(client.tracking_uri, experiment))
    runtime = {**runtime, "cache": redact(runtime.get("cache"))}
    run = client.create_run(exp_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={TAG_ROLE: "search", TAG_RUNTIME: json.dumps(runtime),
                                  "difftune.tune_path": tune_path,
                                  "difftune.model_name": model_name})
    search = space_dict["search"]
    params = {"space": space_dict["name"], "model": space_dict["model"],
              "checkpoint": str(space_dict["checkpoint"]), "data": space_dict["data"],
              "seed": search["seed"], "trials": search["trials"], "metric": search["metric"],
              "code_version": code_version()}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, yaml.safe_dump(space_dict, sort_keys=False), "space.yaml")
    return run.info.run_id


def latest_search_run(client: MlflowClient, experiment: str, *, what: str):
    """The latest parent run of ``experiment``; a clear error when there is none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise TrackingError(f"{what} {experiment!r}: no such experiment in the tracking store; "
                            f"experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"{what} {experiment!r}: the experiment holds no difftune search")
    return runs[0]


def trial_run_ids(client: MlflowClient, parent_run_id: str) -> dict[str, str]:
    """trial id -> child run id of a search."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10000)
    return {r.data.tags[TAG_TRIAL]: r.info.run_id for r in runs if TAG_TRIAL in r.data.tags}


def space_from_run(client: MlflowClient, parent_run_id: str):
    """The resolved space a search ran with, from its parent run's ``space.yaml``."""
    import tempfile

    from search.space import Space

    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(parent_run_id, "space.yaml", d)
        data = yaml.safe_load(Path(path).read_text())
    return Space(**data)


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
        self._outbox.append((trial.trial_id, decode_config(trial.config), str(trial), fn))
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
        epochs = int(decode_config(trial.config).get(self.epochs_key, 0) or 0)
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


def log_champion(client: MlflowClient, *, tracking_uri: str, parent_run_id: str,
                 best_run_id: str, checkpoint_dir: str, model_name: str,
                 best_config: dict[str, Any], metric_value: float) -> int:
    """Log the best trial's head as an MLflow PyTorch model on its run, register it under
    ``model_name`` with the alias ``champion``, and put the best config on the parent run.

    :return: the registered model version.
    """
    import trainables
    from trainables.trainable import load_head

    head, _, _ = load_head(checkpoint_dir)
    head.eval()
    mlflow.set_tracking_uri(tracking_uri)
    # pickled with the trainables package beside it, so every head type loads anywhere
    code = str(Path(trainables.__file__).parent)
    # the pickle format is deliberate (every head type, code shipped beside it): no warning
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=best_run_id):
        mlflow.log_artifacts(checkpoint_dir, artifact_path="head_checkpoint")
        info = mlflow.pytorch.log_model(head, name="head", code_paths=[code],
                                        serialization_format="pickle",
                                        pip_requirements=["torch"])
    mv = mlflow.register_model(info.model_uri, model_name)
    client.set_registered_model_alias(model_name, "champion", mv.version)
    client.set_model_version_tag(model_name, mv.version, "run_id", best_run_id)
    client.log_text(parent_run_id, yaml.safe_dump(best_config, sort_keys=True), "best_config.yaml")
    client.log_metric(parent_run_id, "best_val_top1", metric_value)
    client.set_tag(parent_run_id, "best_run_id", best_run_id)
    return int(mv.version)
