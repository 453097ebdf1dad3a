"""How a search opens in the MLflow UI.

MLflow 3's UI opens an experiment on its GenAI overview (traces, token charts) unless the
experiment is one of machine learning: difftune declares its experiments' kind (the tag
``mlflow.experimentKind``, which MLflow 3.0-3.x read) and the link it prints asks for the
model-training view in the URL (``workflowType=machine_learning``, which later 3.x read).

The UI's URL state holds only filters and sorting; which columns show is kept per browser.
A *shared view* (``viewStateShareKey``: an experiment tag ``mlflow.sharedViewState.KEY``
holding the view's state, what the UI's own "Share" button writes) carries the columns too,
so the printed links open every search of the experiment (trials nested under each) and
this search's trials, best first, with their key columns.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from difftune.search.records.tracking import TAG_ROLE

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
VIEW_TAG = "mlflow.sharedViewState."
#: the trials' columns the printed link shows
KEY_PARAMS = ("head", "block", "t", "pool", "lr")
KEY_METRICS = ("val_top1", "test_top1")
#: where ``difftune ui`` serves a local store
LOCAL_UI = "http://127.0.0.1:5000"


def declare_kind(client: MlflowClient, experiment_id: str) -> None:
    """Mark the experiment as machine learning (it opens on its runs, not on traces)."""
    exp = client.get_experiment(experiment_id)
    if exp.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(experiment_id, KIND_TAG, KIND)


def _columns(metric: str, extra: tuple[str, ...] = ()) -> list[str]:
    metrics = [metric, *[m for m in (*KEY_METRICS, *extra) if m != metric]]
    return [f"params.`{p}`" for p in KEY_PARAMS] + [f"metrics.`{m}`" for m in metrics]


def _store_view(client: MlflowClient, experiment_id: str, state: dict) -> str:
    text = json.dumps(state, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    client.set_experiment_tag(experiment_id, f"{VIEW_TAG}{key}", text)
    return key


def trials_view(client: MlflowClient, experiment_id: str, parent_run_id: str, *,
                metric: str = "val_top1", ascending: bool = False) -> str:
    """Store the shared view of one search's trials (sorted by ``metric``, key columns
    shown) on the experiment; returns its key."""
    columns = _columns(metric)
    return _store_view(client, experiment_id, {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": f"metrics.`{metric}`", "orderByAsc": ascending,
        "selectedColumns": columns, "columnOrder": columns})


def experiment_view(client: MlflowClient, experiment_id: str, *, metric: str = "val_top1"
                    ) -> str:
    """Store the shared view of every search of the experiment (newest first, trials nested
    under their search, the key columns and each search's best score shown); returns its
    key."""
    columns = _columns(metric, (f"best_{metric}",))
    return _store_view(client, experiment_id, {"selectedColumns": columns,
                                               "columnOrder": columns})


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or ``difftune ui``'s for a local
    store."""
    from difftune.search.records.uris import server_ui

    ui = server_ui(tracking_uri)
    return ui.rstrip("/") if ui else LOCAL_UI


def view_link(base: str, experiment_id: str, view_key: str | None = None) -> str:
    """The experiment's runs in the model-training view (with a shared view's state)."""
    share = f"viewStateShareKey={quote(view_key)}&" if view_key else ""
    return f"{base}/#/experiments/{experiment_id}/runs?{share}workflowType=machine_learning"


def setup(client: MlflowClient, tracking_uri: str, parent_run_id: str, *, metric: str,
          mode: str) -> tuple[str, str]:
    """Declare the experiment's kind and store its two views; returns the links to every
    search of the experiment and to this search's trials."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    declare_kind(client, exp_id)
    trials = trials_view(client, exp_id, parent_run_id, metric=metric, ascending=mode == "min")
    every = experiment_view(client, exp_id, metric=metric)
    base = ui_base(tracking_uri)
    return view_link(base, exp_id, every), view_link(base, exp_id, trials)


def experiment_links(client: MlflowClient, base: str) -> list[tuple[str, str]]:
    """``(experiment name, link)`` for every experiment holding a difftune search, the most
    recently searched first: the link a search prints to every search of its experiment
    (:func:`experiment_view`, by the metric of its latest search), the view stored again."""
    found = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'search'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if not runs:
            continue
        metric = runs[0].data.params.get("metric") or "val_top1"
        declare_kind(client, exp.experiment_id)
        key = experiment_view(client, exp.experiment_id, metric=metric)
        found.append((runs[0].info.start_time or 0, exp.name,
                      view_link(base, exp.experiment_id, key)))
    return [(name, link) for _, name, link in sorted(found, key=lambda f: -f[0])]
