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
