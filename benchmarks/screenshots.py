"""The README's screenshots, made the way the browser test checks the UI: a real
`mlflow server` on 127.0.0.1, the demo search recorded to it, and headless Chromium (Debian's,
driven by Playwright) on the experiment page (the search with its trials unfolded, key
columns shown) and on the block x timestep figure among the search run's artifacts.

Measured on the way: the lines the demo search prints on its console, its wall time, and the
time `difftune report` takes to draw the six figures of the finished search into a folder.

    python -m benchmarks.screenshots [--trials 20] [--out benchmarks/screenshots] [--keep DIR]
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from benchmarks._results import arguments, record

REPO = Path(__file__).resolve().parents[1]


def tests_helpers() -> ModuleType:
    """The tests' ``helpers`` module (the mlflow server and Chromium the browser test uses),
    loaded from its file: ``tests/`` is not a package, and the screenshots are made exactly
    as that test makes its pages, with its code, not a copy of it."""
    name = "difftune_tests_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "helpers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it, as an import would
        spec.loader.exec_module(module)
    return sys.modules[name]

ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
SIDEBAR_TOGGLE = '[data-component-id="mlflow_header.toggle_sidebar_button"]'


def cli(*args: str, cwd: Path) -> tuple[str, float]:
    """Run ``difftune ARGS`` as a user would; (everything it printed, seconds)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "difftune", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"difftune {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stderr + done.stdout, took


def tidy(page) -> None:
    """Close the MLflow Assistant side panel (it takes a third of the page) and the shared
    view's banner (its own close button, not "Exit shared view")."""
    close = page.locator(ASSISTANT_CLOSE)
    if close.count():
        close.first.click()
    banner = page.get_by_text("You're viewing a shared view")
    if banner.count():
        box = banner.first.locator("xpath=ancestor::div[.//button][1]")
        box.locator("button").last.click()


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "screenshots"))
    ap.add_argument("--keep", help="keep the store, runs and figures in this folder")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="difftune-shots-"))
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    helpers = tests_helpers()
    try:
        with helpers.mlflow_server(root / "server") as uri:
            printed, wall = cli("search", "--trials", str(args.trials), "--tracking-uri", uri,
                                "--storage", str(root / "runs"), "--cache",
                                str(root / "cache"), cwd=root)
            lines = len(printed.strip().splitlines())
            links = dict(re.findall(r"^UI: (this search's trials|every search): +(\S+)$",
                                    printed, re.M))
            parent = re.search(r"on the search's run (\w+)", printed)[1]
            _, report_s = cli("report", "difftune-demo", "--tracking-uri", uri, "--out",
                              str(root / "figures"), cwd=root)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("difftune-demo")
            run = next(r for r in client.search_runs([exp.experiment_id])
                       if r.info.run_id.startswith(parent))
            with helpers.chromium_page(root / "chromium-profile", width=1400, height=860) as page:
                page.set_default_timeout(60_000)
                page.goto(links["every search"])
                row = page.locator('[role="row"]', has_text=run.info.run_name).first
                row.wait_for()
                tidy(page)
                row.locator('[col-id="attributes.`Run Name`"] button').first.click()
                page.locator('[role="row"][row-index="3"]').first.wait_for()
                time.sleep(2)
                page.screenshot(path=str(out / "experiment.png"))
                page.set_viewport_size({"width": 1500, "height": 1000})  # the figure, readable
                page.goto(f"{uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                          "/artifacts?workflowType=machine_learning")
                page.get_by_text("figures", exact=True).first.click()
                page.get_by_text("block_timestep.png", exact=True).first.click()
                page.locator("img[alt='figures/block_timestep.png']").first.wait_for()
                tidy(page)
                page.locator(SIDEBAR_TOGGLE).first.click()
                time.sleep(2)
                page.screenshot(path=str(out / "block_timestep.png"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    record("see_the_search", trials=args.trials, console_lines=lines, search_wall_s=wall,
           report_s=report_s, screenshots=f"{out.name}/experiment.png,{out.name}/"
           "block_timestep.png", goal="console_lines<=100")


if __name__ == "__main__":
    main()
