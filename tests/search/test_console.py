"""A search's console: difftune's lines on the terminal, the libraries' warnings and prints
in the log file, each library error once and in one line; -v leaves them on the terminal;
logging is restored afterwards."""

from __future__ import annotations

import logging

import ray  # noqa: F401  (its logger with its own handler exists, as in a search)

from difftune.search.report.console import SearchConsole, out

SNAPSHOT = "Experiment state snapshotting has been triggered multiple times"


def test_libraries_go_to_the_log_file_and_difftune_to_the_terminal(tmp_path, capsys):
    ray_log = logging.getLogger("ray")
    before = (list(ray_log.handlers), ray_log.propagate)
    log = tmp_path / "driver.log"
    with SearchConsole() as console:
        logging.getLogger("ray.tune.execution.experiment_state").warning(SNAPSHOT)
        console.open_log(log)  # what came before the file is in it too
        for _ in range(3):
            logging.getLogger("ray.tune.execution.experiment_state").warning(SNAPSHOT)
            logging.getLogger("ray.tune").error("Trial task failed\nTraceback ...\nValueError")
        logging.getLogger("difftune.search.x").info("search demo: 20 trials")
        out.info("done 1/20  linear b10 t90 p2")
        with console.library_stdout():
            print("To visualize your results with TensorBoard, run: ...")
    err = capsys.readouterr().err.strip().splitlines()
    assert not any(SNAPSHOT in line for line in err)
    failed = [x for x in err if "Trial task failed" in x]
    assert len(failed) == 1 and failed[0].endswith(f"Trial task failed (more in {log})")
    assert any(x.endswith("INFO difftune.search.x: search demo: 20 trials") for x in err)
    assert any(x.endswith("  done 1/20  linear b10 t90 p2") and "INFO" not in x for x in err)
    assert len(err) == 3
    text = log.read_text()
    assert text.count(SNAPSHOT) == 4 and text.count("Traceback ...") == 3
    assert "TensorBoard" in text
    assert (list(ray_log.handlers), ray_log.propagate) == before


def test_verbose_keeps_library_warnings_on_the_terminal(tmp_path, capsys):
    with SearchConsole(verbose=True) as console:
        console.open_log(tmp_path / "driver.log")
        logging.getLogger("somelib.study").warning("a library warning")
        with console.library_stdout():
            print("Configuration for experiment")
    captured = capsys.readouterr()
    assert "a library warning" in captured.err
    assert "Configuration for experiment" in captured.out


def _trial(config: dict) -> None:
    """A trainable like difftune's: one that cannot run reports its failure and ends; one
    that raises is retried by Ray Tune and then fails."""
    from ray import tune

    from difftune.trainables.trainable import FAILED_METRICS, FAILURE_KEY

    if config["block"] == 24:
        tune.report({FAILURE_KEY: "config", "error": "checkpoint rand256.pt does not exist",
                     **dict.fromkeys(FAILED_METRICS, float("nan"))})
        return
    if config["block"] == 25:
        raise ValueError("a bug in the trainable")
    for epoch in (1, 2):
        tune.report({"val_top1": 50.0 + epoch, "epoch": epoch})


def test_a_failed_trial_reads_as_failed_with_its_reason(ray_session, tmp_path, caplog):
    """Through a real Tuner: the trial that reported a failure and the one that raised are
    ``failed N/T`` with their one-line reason; the best is the finished trial's."""
    from ray import tune

    from difftune.search.report.console import ConsoleTable

    base = {"head": "linear", "t": 150, "pool": 2}
    configs = [{**base, "block": b} for b in (24, 10, 25)]
    table = ConsoleTable(metric="val_top1", mode="max", total=3, every_s=3600)
    tuner = tune.Tuner(
        _trial, param_space={"block": tune.grid_search([24, 10, 25]), **base},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="console", verbose=0,
                                  callbacks=[table],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    with caplog.at_level(logging.INFO, logger=out.name):
        tuner.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == out.name]
    assert len(configs) == 3 and len(lines) == 3, lines
    failed = [x for x in lines if x.startswith("failed ")]
    assert len(failed) == 2 and not any("nan" in x or x.startswith("done") for x in failed)
    assert any(x.startswith("failed ") and "linear b24 t150 p2" in x
               and x.endswith("config: checkpoint rand256.pt does not exist") for x in failed)
    assert any("linear b25 t150 p2" in x and "ValueError: a bug in the trainable" in x
               for x in failed)
    (done,) = [x for x in lines if x.startswith("done ")]
    assert "linear b10 t150 p2" in done and "val_top1 52.00 after 2 epochs" in done
    assert done.endswith("best 52.00")
    positions = sorted(x.split()[1] for x in lines)
    assert positions == ["1/3", "2/3", "3/3"]
