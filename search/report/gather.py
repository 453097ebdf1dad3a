"""A search as its figures and its report read it: the parent run, the space it ran with, and
one row per trial gathered from MLflow (:func:`gather`). It works on any search, finished,
running or killed, since it reads only what the tracking store holds.

A grid trial (a grid of heads inside one trial) is read as its best head: its settings with
its ``grid_best`` point put in. The confirm stage's runs (``difftune.stage=confirm``: the top
configs retrained on more labels) are kept apart from the search's trials: the figures show
what the search tried, and the champion, when it is a confirmed run, is marked on the search
trial it retrained.

:func:`~.draw.write_figures` draws every figure from it, into a folder or onto the parent run;
:mod:`.description` writes the parent run's description.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from difftune.search.records.best import Candidate, rank_trials
from difftune.search.records.tracking import TAG_CONFIG, TAG_ROLE, TAG_TRIAL, latest_search_run
from difftune.search.records.uris import TrackingError
from difftune.search.space.spec import Space
from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.heads import KINDS, head_kind
from difftune.trainables.train.grid import GRID_BEST, with_point

logger = logging.getLogger(__name__)

#: the artifact folder of the figures on the parent run
FIGURES_DIR = "figures"
#: trials whose learning curves are drawn
TOP_CURVES = 6
#: the tag that tells the search's trials from the confirm stage's runs
TAG_STAGE = "difftune.stage"


@dataclass
class TrialRow:
    """One trial as the figures read it.

    :param order: its position in the search (0 = first started).
    :param config: its settings (``TrialConfig`` names; the run's ``difftune.config`` tag).
    :param score: the search metric at its last reported epoch (None: none reported yet).
    :param metrics: its run's latest metrics (``val_top1``, ``test_top1`` when present, ...).
    :param status: the run's status (``FINISHED``, ``RUNNING``, ``FAILED``, ``KILLED``).
    :param stage: ``search``, or ``confirm`` for a run of the confirm stage.
    :param confirms: a confirm run's search trial (its run id), when one matches.
    """

    run_id: str
    name: str
    trial_id: str
    order: int
    config: dict[str, Any]
    score: float | None
    metrics: dict[str, float]
    status: str
    epochs: int = 0
    early_stopped: bool = False
    stage: str = "search"
    confirms: str | None = None

    @property
    def rung(self) -> int:
        """The rung over images it was last scored at (0 without rungs)."""
        return int(self.metrics.get("image_rung") or 0)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and self.score is not None and math.isfinite(self.score)


@dataclass
class SearchData:
    """What a search's figures and report are drawn from."""

    experiment: str
    experiment_id: str
    parent_run_id: str
    parent_status: str
    parent_name: str
    space: Any  # difftune.search.space.spec.Space, or None when space.yaml is missing
    metric: str
    mode: str
    trials: list[TrialRow]
    champion_run_id: str | None = None
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    parent_tags: dict[str, str] = field(default_factory=dict)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    #: the confirm stage's runs (the search's top configs retrained), in order
    confirmed: list[TrialRow] = field(default_factory=list)

    def ranked(self) -> list[TrialRow]:
        """Finished trials, best first (:mod:`.best`'s rule)."""
        cands = [Candidate(key=t.run_id, order=t.order, score=t.score, epochs=t.epochs,
                           ok=t.finished, data=t, rung=t.rung) for t in self.trials]
        return [c.data for c in rank_trials(cands, mode=self.mode)]

    @property
    def champion(self) -> TrialRow | None:
        """The registered champion's search trial (for a confirmed champion: the trial it
        retrained), else the best finished trial."""
        by_id = {t.run_id: t for t in self.trials}
        confirm = self.champion_confirmed
        run_id = confirm.confirms if confirm is not None else self.champion_run_id
        if run_id in by_id:
            return by_id[run_id]
        ranked = self.ranked()
        return ranked[0] if ranked else None

    @property
    def champion_confirmed(self) -> TrialRow | None:
        """The confirm run registered as the champion, if the champion is one."""
        return next((t for t in self.confirmed if t.run_id == self.champion_run_id), None)

    def objectives(self) -> list[dict[str, str]]:
        """The search's objectives (``[{metric, mode}]`` for a single-objective search)."""
        if self.space is not None:
            return self.space.objectives()
        return [{"metric": self.metric, "mode": self.mode}]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    @property
    def metric_label(self) -> str:
        """The metric as axis labels spell it (``val top-1 (%)``)."""
        return metric_label(self.metric)


def metric_label(metric: str) -> str:
    """``val_top1`` -> ``val top-1 (%)``; other names as they are."""
    split, _, kind = metric.partition("_")
    if kind.startswith("top") and kind[3:].isdigit():
        return f"{split} top-{kind[3:]} (%)"
    return metric.replace("_", " ")


def score_text(metric: str, value: float | None) -> str:
    """``val top-1 94.44%`` (a percent metric) or ``val loss 0.213``."""
    if value is None:
        return f"{metric_label(metric)} -"
    label = metric_label(metric)
    if label.endswith(" (%)"):
        return f"{label[:-4]} {value:.2f}%"
    return f"{label} {value:.4g}"


def trial_label(config: dict[str, Any]) -> str:
    """A trial in a few characters: ``linear b10 t90 p2`` (head, block, timestep, pool when
    the head reads it); heads reading several blocks or timesteps list them
    (``difformer b7+10 t10+90``)."""
    head = str(config.get("head", "?"))
    blocks, times = reads(config)
    b = "+".join(str(x) for x in blocks) if blocks else "?"
    t = "+".join(str(x) for x in times) if times else "?"
    kind = KINDS.get(head)
    pool = f" p{config.get('pool')}" if kind is None or "pool" in kind.settings else ""
    return f"{head} b{b} t{t}{pool}"


def reads(config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(blocks, timesteps) the head of a trial reads (DifFeed: its head block and t)."""
    try:
        cfg = TrialConfig.from_dict({k: v for k, v in config.items() if v is not None})
        kind = head_kind(cfg.head)
    except (UserError, TypeError, ValueError):
        return [], []
    if kind.live_unet:
        return [cfg.block], [cfg.t]
    req = kind.requests(cfg)
    return sorted({b for _, b, _ in req}), sorted({t for t, _, _ in req})


def blocks_read(config: dict[str, Any]) -> list[int]:
    """Every U-Net block a trial's forward pass must reach (``HeadKind.blocks``)."""
    try:
        cfg = TrialConfig.from_dict({k: v for k, v in config.items() if v is not None})
        return head_kind(cfg.head).blocks(cfg)
    except (UserError, TypeError, ValueError):
        return []


# ---- gathering ------------------------------------------------------------------------------
def find_search(client: MlflowClient, experiment: str, run_id: str | None = None):
    """The parent run of ``experiment``'s latest search (or of ``run_id``)."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:
            raise TrackingError(f"--run {run_id}: no such run in the tracking store") from None
        if run.data.tags.get(TAG_ROLE) != "search":
            raise TrackingError(f"--run {run_id}: not a difftune search's parent run (its "
                                f"{TAG_ROLE} tag is {run.data.tags.get(TAG_ROLE)!r})")
        return run
    return latest_search_run(client, experiment, what="report")


def gather(client: MlflowClient, parent_run_id: str, *, curves: int = TOP_CURVES) -> SearchData:
    """Read a search's parent run and its trials' runs from MLflow."""
    parent = client.get_run(parent_run_id)
    exp = client.get_experiment(parent.info.experiment_id)
    tags, params = parent.data.tags, parent.data.params
    runs = _children(client, parent.info.experiment_id, parent_run_id)
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    metric, mode = params.get("metric", "val_top1"), params.get("mode", "max")
    trials, confirmed, settings = [], [], {}
    for r in runs:
        try:
            raw = json.loads(r.data.tags.get(TAG_CONFIG, "{}"))
            config = with_point(raw, r.data.tags.get(GRID_BEST))  # a grid: its best head
        except (json.JSONDecodeError, TypeError):
            raw, config = {}, {}
        m = dict(r.data.metrics)
        score = m.get(metric)
        stage = r.data.tags.get(TAG_STAGE, "search")
        row = TrialRow(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8],
            trial_id=r.data.tags.get(TAG_TRIAL, ""), order=len(trials), config=config,
            score=float(score) if score is not None else None, metrics=m,
            status=r.info.status, epochs=int(m.get("epoch", 0) or 0),
            early_stopped=r.data.tags.get("early_stopped") == "true", stage=stage)
        if stage == "confirm":
            row.order = len(confirmed)
            row.confirms = settings.get(_setting_key(raw))
            confirmed.append(row)
        else:
            settings.setdefault(_setting_key(raw), row.run_id)
            trials.append(row)
    data = SearchData(
        experiment=exp.name, experiment_id=exp.experiment_id, parent_run_id=parent_run_id,
        parent_status=parent.info.status, parent_name=parent.info.run_name or "",
        space=_space(client, parent_run_id), metric=metric, mode=mode, trials=trials,
        champion_run_id=tags.get("best_run_id"), plan=_json_artifact(client, parent_run_id,
                                                                     "plan.json"),
        parent_tags=dict(tags), parent_metrics=dict(parent.data.metrics),
        confirmed=confirmed)
    for t in data.ranked()[:curves]:
        data.histories[t.run_id] = [(h.step, h.value) for h in
                                    client.get_metric_history(t.run_id, metric)]
    return data


def _setting_key(config: dict[str, Any]) -> str:
    """What a confirm run shares with the search trial it retrains: the config but its
    label fraction."""
    return json.dumps({k: v for k, v in config.items() if k != "label_fraction"},
                      sort_keys=True, default=str)


def _children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=1000, page_token=token)
        out += [r for r in page if r.data.tags.get(TAG_ROLE, "trial") == "trial"]
        token = page.token
        if not token:
            return out


def _space(client: MlflowClient, run_id: str):

    data = _artifact_text(client, run_id, "space.yaml")
    if data is None:
        return None
    try:
        return Space(**yaml.safe_load(data))
    except (TypeError, yaml.YAMLError) as exc:
        logger.warning("space.yaml of run %s is unreadable (%s)", run_id, exc)
        return None


def _json_artifact(client: MlflowClient, run_id: str, path: str) -> dict | None:
    text = _artifact_text(client, run_id, path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _artifact_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    if path not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as d:
        return Path(client.download_artifacts(run_id, path, d)).read_text()
