"""Search on a subset, confirm on all the data: the top ``confirm_top`` configs of a search
(ranked by :mod:`difftune.search.records.best`'s rule) are retrained at
``confirm_label_fraction`` (default: all labels) for their full epochs (the Tuner of
:func:`~.tuner.build_tuner` given their configs), as child runs of the same parent run tagged
``difftune.stage=confirm``; the champion is then the best confirmed config, by the same rule.

The parent run records ``confirm_spearman``: the rank correlation between the configs'
search scores and their confirmed scores (how far the subset's ranking can be trusted).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from mlflow.tracking import MlflowClient
from scipy.stats import spearmanr

from difftune.search.records.best import Candidate, rank_trials
from difftune.search.records.uris import storage_join
from difftune.search.run.trials import MLflowTrials
from difftune.search.run.tuner import build_tuner
from difftune.search.space.spec import Space
from difftune.trainables.trainable import RuntimeOptions

logger = logging.getLogger(__name__)

TAG_STAGE = "difftune.stage"


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two score lists (None for fewer than 3 pairs or a
    constant list)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def confirm_top(space: Space, ranked: list[Candidate], *, runtime: RuntimeOptions,
                tracking_uri: str, parent: str, tune_path: str, verbose: int = 1
                ) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Retrain the best ``confirm_top`` of ``ranked`` (candidates whose ``data`` is a Ray Tune
    result) at ``confirm_label_fraction``.

    :return: ``(confirmed candidates ranked by the rule, rows)``; a row per config: its
        search trial, search score, confirmed score and confirmed run's trial id.
    """
    s = space.search
    top = ranked[: int(s["confirm_top"])]
    fraction = s.get("confirm_label_fraction")
    configs = [{**c.data.config, "label_fraction": fraction} for c in top]
    logger.info("confirm: retraining the top %d configs at label_fraction %s", len(configs),
                fraction if fraction is not None else "1 (all labels)")
    # the confirm trials read what they ask: nothing else is extracted for them
    # ... and every image at once (no rungs over images: each runs to its last epoch)
    confirm_runtime = dataclasses.replace(runtime, extra_blocks=(), store_pool=None,
                                          cache_policy="per-request", image_rungs=())
    client = MlflowClient(tracking_uri)
    # a Tune experiment of its own beside the search's (a URI keeps its query at the end)
    base, sep, query = tune_path.partition("?") if "://" in tune_path else (tune_path, "", "")
    storage = base.rstrip("/").rsplit("/", 1)[0] + sep + query
    name = f"{base.rstrip('/').rsplit('/', 1)[1]}-confirm"
    tuner = build_tuner(space, runtime=confirm_runtime, storage_path=storage, name=name,
                        configs=configs, verbose=verbose,
                        callbacks=[MLflowTrials(tracking_uri, parent,
                                                outbox_dir=storage_join(storage, name),
                                                tags={TAG_STAGE: "confirm"})])
    results = list(tuner.fit())
    confirmed, rows = [], []
    for search, config in zip(top, configs, strict=True):
        r = next(r for r in results if r.config == config)
        results.remove(r)
        metrics = r.metrics or {}
        score = metrics.get(s["metric"])
        score = float(score) if isinstance(score, (int, float)) else None
        confirmed.append(Candidate(key=str(metrics.get("trial_id", search.key)),
                                   order=search.order, score=score,
                                   epochs=int(metrics.get("epoch", 0) or 0),
                                   ok=r.error is None, data=r))
        rows.append({"search_trial_id": search.key, "search_score": search.score,
                     "confirmed_score": score, "trial_id": confirmed[-1].key})
    pairs = [(r["search_score"], r["confirmed_score"]) for r in rows
             if r["confirmed_score"] is not None]
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
    if rho is not None:
        client.log_metric(parent, "confirm_spearman", rho)
    logger.info("confirm: done; Spearman(search, confirmed) = %s", rho)
    return rank_trials(confirmed, mode=s["mode"]), rows
