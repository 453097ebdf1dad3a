"""The MLflow UI of a search, checked in a real browser: a real `mlflow server` on 127.0.0.1,
a 3-trial demo search recorded to it, and headless Chromium (Debian's, driven by Playwright)
reading what the rendered pages show: the experiment opening on its runs with the trials
nested under the search, the printed link's trials with their key columns, a trial's params
and val_top1, the figures among the parent run's artifacts, and the registered model with
its `champion` alias.

Needs /usr/bin/chromium (`.ci/run` installs it and sets DIFFTUNE_REQUIRE_BROWSER=1, so that a
missing browser fails there instead of skipping)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from helpers import CHROMIUM, chromium_page, mlflow_server
from mlflow.tracking import MlflowClient

from difftune.search.cli import main

pytestmark = pytest.mark.slow
TIMEOUT_MS = 60_000

if not Path(CHROMIUM).exists():
    if os.environ.get("DIFFTUNE_REQUIRE_BROWSER"):
        raise RuntimeError(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory):
    """A real mlflow server with one 3-trial demo search recorded on it."""
    root = tmp_path_factory.mktemp("ui")
    with mlflow_server(root / "server") as uri:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["search", "--trials", "3", "--set", "epochs=2", "--experiment", "ui",
                       "--tracking-uri", uri, "--storage", str(root / "runs"),
                       "--cache", str(root / "cache")])
        assert rc == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ui")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        (parent,) = [r for r in runs if r.data.tags.get("difftune.role") == "search"]
        trials = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
        links = dict(re.findall(r"^UI: (this search's trials|every search): +(\S+)$",
                                out.getvalue(), re.M))
        with chromium_page(root / "chromium-profile") as page:
            page.set_default_timeout(TIMEOUT_MS)
            yield {"uri": uri, "client": client, "exp": exp, "parent": parent,
                   "trials": trials, "links": links, "page": page}


def test_experiment_opens_on_its_runs_with_the_trials_nested_under_the_search(search):
    page, parent = search["page"], search["parent"]
    page.goto(search["links"]["every search"])
    row = page.locator('[role="row"]', has_text=parent.info.run_name).first
    row.wait_for()
    assert page.get_by_text("Run Name", exact=True).first.is_visible()  # the runs table
    names = [t.info.run_name for t in search["trials"]]
    assert not any(page.get_by_text(n, exact=True).count() for n in names)  # folded
    row.locator('[col-id="attributes.`Run Name`"] button').first.click()  # unfold
    for n in names:
        page.locator('[role="row"]', has_text=n).first.wait_for()
    # the trials' rows come right under the search's row, as its children
    shown = page.locator('[role="row"][row-index]').all_inner_texts()
    first = next(i for i, text in enumerate(shown) if parent.info.run_name in text)
    assert all(any(n in text for n in names) for text in shown[first + 1:first + 4])


def test_printed_link_shows_the_trials_best_first_with_their_key_columns(search):
    page = search["page"]
    page.goto(search["links"]["this search's trials"])
    best = max(search["trials"], key=lambda r: r.data.metrics["val_top1"])
    page.locator('[role="row"]', has_text=best.info.run_name).first.wait_for()
    headers = page.locator('[role="columnheader"]').all_inner_texts()
    for column in ("val_top1", "head", "block", "t", "pool", "lr"):
        assert any(h.strip() == column for h in headers), headers
    first = page.locator('[role="row"][row-index="0"]').first.inner_text()
    assert best.info.run_name in first
    assert search["parent"].info.run_name not in page.locator("body").inner_text()


def test_a_trials_run_page_shows_its_params_and_val_top1(search):
    page = search["page"]
    # a head is searched only over the settings it reads: a trial with all four (the paper's
    # linear config runs first)
    trial = next(t for t in search["trials"]
                 if {"block", "t", "pool", "head"} <= set(t.data.params))
    page.goto(f"{search['uri']}/#/experiments/{search['exp'].experiment_id}/runs/"
              f"{trial.info.run_id}")
    page.get_by_text("val_top1", exact=True).first.wait_for()
    text = page.locator("body").inner_text()
    for name in ("block", "t", "pool", "head"):
        assert f"\n{name}\n{trial.data.params[name]}\n" in text, name
    assert str(trial.data.metrics["val_top1"])[:5] in text


def test_the_search_run_lists_its_figures(search):
    page, parent = search["page"], search["parent"]
    page.goto(f"{search['uri']}/#/experiments/{search['exp'].experiment_id}/runs/"
              f"{parent.info.run_id}/artifacts")
    page.get_by_text("figures", exact=True).first.click()
    for name in ("block_timestep", "history", "cost", "curves"):
        page.get_by_text(f"{name}.png", exact=True).first.wait_for()
        assert page.get_by_text(f"{name}.html", exact=True).count() == 1
    page.get_by_text("block_timestep.png", exact=True).first.click()
    image = page.locator("img[alt='figures/block_timestep.png']").first
    image.wait_for()
    assert image.evaluate("e => e.naturalWidth") > 800  # the PNG itself, loaded


def test_the_registered_model_shows_the_champion_alias(search):
    page = search["page"]
    version = search["client"].get_model_version_by_alias("difftune-ui", "champion")
    page.goto(f"{search['uri']}/#/models/difftune-ui")
    row = page.locator('[role="row"]', has_text=f"Version {version.version}").first
    row.wait_for()
    assert "champion" in row.inner_text()
    assert version.run_id in {t.info.run_id for t in search["trials"]}
