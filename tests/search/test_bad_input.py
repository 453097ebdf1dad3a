"""Every mistake a user can make ends in one clear line naming the setting and what is
allowed, exit code 2, and nothing written: no MLflow store, no cache, no Tune storage."""

from __future__ import annotations

import re

import pytest
import torch

from difftune.search.cli import main

GOOD_SPACE = """
model: demo
params:
  block: {int: [1, 19]}
  t: {choice: [10, 90]}
"""


class Pickled:  # a class: torch.load(weights_only=True) refuses to unpickle it
    pass


def cases(tmp):
    (tmp / "unknown.yaml").write_text(GOOD_SPACE + "bogus: 1\n")
    (tmp / "malformed.yaml").write_text("model: demo\nparams: {block: [1, 2}\n")
    (tmp / "empty.yaml").write_text("model: demo\nparams:\n  pool: {choice: []}\n")
    (tmp / "block0.yaml").write_text(GOOD_SPACE.replace("[1, 19]", "[0, 19]"))
    space = {  # numbers in a space file: a number in its allowed range, or one line
        "lr_text": "params:\n  lr: {float: [fast, 0.1], log: true}\n",
        "t_half": "params:\n  t: {int: [0, 50.5]}\n",
        "step0": "params:\n  t: {int: [0, 500], step: 0}\n",
        "steplog": "params:\n  lr: {float: [1e-3, 1e-1], log: true, step: 1e-3}\n",
        "dropout": "params:\n  head: {choice: {mlp: {dropout: {float: [0, 1.5]}}}}\n",
        "min3": "params:\n  head: {choice: [difformer]}\n  blocks: {subset: [7, 10], min: 3}\n",
        "trials": "search: {trials: -1}\n",
        "trials_text": "search: {trials: ten}\n",
        "gpus": "search: {gpus_per_trial: -1}\n",
        "rf": "search: {reduction_factor: 1}\n",
        "failures": "search: {max_failures: -1}\n",
        "cache_pool": "search: {cache_pool: 0}\n",
        "fraction": "label_fraction: 1.5\n",
        "batch": "fixed: {batch_size: 0}\n",
    }
    for name, text in space.items():
        (tmp / f"{name}.yaml").write_text("model: demo\n" + text)
    (tmp / "image.png").write_bytes(b"not read")
    (tmp / "noclasses" / "train").mkdir(parents=True)
    (tmp / "noclasses" / "val").mkdir(parents=True)
    other = {"weight": torch.zeros(3, 3)}
    torch.save(other, tmp / "other.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Pickled()}, tmp / "pickled.pt")
    s = ["search"]

    def sp(name: str) -> list[str]:
        return ["search", "--space", str(tmp / f"{name}.yaml")]

    return [
        (s + ["--space", str(tmp / "unknown.yaml")], "unknown key(s) ['bogus']"),
        (s + ["--space", str(tmp / "malformed.yaml")], "is not valid YAML"),
        (s + ["--space", str(tmp / "empty.yaml")], "params.pool.choice is empty"),
        (s + ["--space", str(tmp / "block0.yaml")], "block 0 is out of range; model demo has blocks 1..19"),
        (s + ["--set", "block=20"], "block 20 is out of range; model demo has blocks 1..19"),
        (s + ["--set", "t=1000"], "timestep 1000 is out of range; allowed 0..999"),
        (s + ["--set", "pool=0"], "pool=0 is invalid"),
        (s + ["--set", "head=svm"], "unknown head type; allowed"),
        (s + ["--set", "head=difformer", "--set", "blocks=[10, 25]"],
         "block 25 is out of range; model demo has blocks 1..19"),
        (s + ["--set", "head=diffeed", "--set", "feedback_blocks=[5]"],
         "block 5 is out of range; model demo has blocks 11..19 (decoder blocks)"),
        (s + ["--set", "bogus=1"], "has no setting 'bogus'"),
        (s + ["--space", "nope"], "neither a preset"),
        (s + ["--data", str(tmp / "missing")], "is neither 'digits' nor an existing folder"),
        (s + ["--data", str(tmp / "noclasses")], "has no class subfolders"),
        (s + ["--model", str(tmp / "missing.pt")], "neither a preset (paper256, demo) nor an existing checkpoint"),
        (s + ["--space", "linear"], "needs its checkpoint: download 256x256_diffusion_uncond.pt"),
        (s + ["--space", "linear", "--checkpoint", str(tmp / "missing.pt")], "does not exist"),
        (s + ["--space", "linear", "--checkpoint", str(tmp / "other.pt")],
         "does not fit the model flags"),
        (s + ["--checkpoint", str(tmp / "pickled.pt")], "weights_only=True"),
        (s + ["--tracking-uri", "http://127.0.0.1:9"], "is unreachable"),
        (s + ["--resume", "nope"], "there is no MLflow store"),
        (["export", "--experiment", "nope", "--out", str(tmp / "x.yaml")],
         "there is no MLflow store"),
        (["train", str(tmp / "missing.yaml")], "does not exist"),
        (["probe", "--blocks", "0"], "block 0 is out of range; this model has blocks 1..19"),
        # numbers in a space file
        (sp("lr_text"), "params.lr.float must be [low, high], two numbers; got ['fast', 0.1]"),
        (sp("t_half"), "params.t.int must be [low, high], two integers; got [0, 50.5]"),
        (sp("step0"), "params.t.step=0 is invalid; allowed: an integer > 0"),
        (sp("steplog"), "params.lr: step and log cannot be combined"),
        (sp("dropout"), "dropout=1.5 is invalid; allowed: a number in [0, 1)"),
        (sp("min3"), "params.blocks.min=3 is invalid; allowed: an integer in 1..2"),
        (sp("trials"), "search.trials=-1 is invalid; allowed: an integer >= 1"),
        (sp("trials_text"), "search.trials='ten' is invalid; allowed: an integer >= 1"),
        (sp("gpus"), "search.gpus_per_trial=-1 is invalid; allowed: a number >= 0"),
        (sp("rf"), "search.reduction_factor=1 is invalid; allowed: a number > 1"),
        (sp("failures"), "search.max_failures=-1 is invalid; allowed: an integer >= 0"),
        (sp("cache_pool"), "search.cache_pool=0 is invalid; allowed: an integer >= 1"),
        (sp("fraction"), "label_fraction=1.5 is invalid; allowed: a number in (0, 1]"),
        (sp("batch"), "batch_size=0 is invalid; allowed: an integer >= 1"),
        # every numeric flag and setting in its range, before anything starts
        (s + ["--trials", "-1"], "argument --trials: -1 is out of range; allowed: an integer >= 1"),
        (s + ["--trials", "many"], "argument --trials: 'many' is not an integer"),
        (s + ["--gpus-per-trial", "-1"], "argument --gpus-per-trial: -1 is out of range"),
        (s + ["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5 is invalid; allowed: a number >= 0"),
        (s + ["--cpus-per-trial", "0"], "argument --cpus-per-trial: 0 is out of range"),
        (s + ["--max-concurrent", "0"], "argument --max-concurrent: 0 is out of range"),
        (s + ["--seed", "-1"], "argument --seed: -1 is out of range"),
        (s + ["--top", "0"], "argument --top: 0 is out of range"),
        (s + ["--set", "epochs=0"], "epochs=0 is invalid; allowed: an integer >= 1"),
        (s + ["--set", "lr=-1e-3"], "lr=-0.001 is invalid; allowed: a number > 0"),
        (s + ["--set", "momentum=2"], "momentum=2.0 is invalid; allowed: a number in [0, 1]"),
        (s + ["--set", "step_size=0"], "step_size=0 is invalid"),
        (s + ["--storage", "s3://bucket/runs?region=us-east-1&bogus=1"],
         "--storage s3://bucket/runs?region=us-east-1&bogus=1 cannot be opened: Unexpected "
         "query parameter in S3 URI: 'bogus'"),
        (["export", "--experiment", "x", "--out", str(tmp / "x.yaml"), "--top", "0"],
         "argument --top: 0 is out of range"),
        (["train", str(tmp / "missing.yaml"), "--rank", "0"], "argument --rank: 0 is out of range"),
        (["ui", "--port", "70000"], "argument --port: 70000 is out of range; allowed: an integer "
         "in 1..65535"),
        (["probe", "--epochs", "0"], "argument --epochs: 0 is out of range"),
        (["probe", "--lr", "0"], "argument --lr: 0 is out of range; allowed: a number > 0"),
        (["probe", "--label-fraction", "2"], "argument --label-fraction: 2 is out of range"),
        (["extract", "--model", "demo", "--data", "digits", "--timesteps", "90", "--blocks", "2",
          "--pool", "2", "--batch-size", "0"], "argument --batch/--batch-size: 0 is out of range"),
        (["pretrain", "--out", str(tmp / "x.pt"), "--minutes", "-1"],
         "argument --minutes: -1 is out of range"),
        (["cache", "rm", "--t", "-1"], "argument --t: -1 is out of range"),
        (["predict", str(tmp / "missing.png")], "image " + str(tmp / "missing.png") + " does not"),
        (["predict", str(tmp / "image.png")], "there is no MLflow store"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for argv, needle in cases(tmp_path):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, argv
        assert len(err) == 1, (argv, err)
        assert needle in err[0], (argv, err[0])
        assert re.match(rf"difftune {argv[0]}( \w+)?: error: ", err[0]), err[0]
        assert sorted(p.name for p in work.iterdir()) == [], argv  # nothing written
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("space, argv, says", [
    ("linear", ["--image-rungs", "off", "--set", "epochs=1"],
     "--set epochs=1 is below search.grace_period=7 of space linear (ASHA stops no trial "
     "before its grace period, so every trial may run that many epochs); allowed: epochs >= 7, "
     "or a space file with search.grace_period <= 1"),
    ("model: demo\nsearch: {grace_period: 5}\nfixed: {epochs: 3}\n", [],
     "space s: fixed.epochs=3 is below search.grace_period=5"),
    ("model: demo\nsearch: {grace_period: 5}\nparams:\n  epochs: {choice: [2, 4]}\n", [],
     "space s: params.epochs (at most 4) is below search.grace_period=5"),
])
def test_a_setting_the_scheduler_refuses_is_one_line_before_ray_starts(
        tmp_path, monkeypatch, capsys, space, argv, says):
    """ASHA asserts grace_period <= max_t (Ray's AssertionError, a traceback, once the Tuner
    is built): the space check says it first, naming the settings."""
    import ray

    monkeypatch.chdir(tmp_path)
    if "\n" in space:
        (tmp_path / "s.yaml").write_text(space)
        space = str(tmp_path / "s.yaml")
    rc = main(["search", "--space", space, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("difftune search: error: ") and says in err[0], err[0]
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["s.yaml"] if argv == [] else [])


def test_the_scheduler_takes_every_space_the_checks_let_through():
    """At the edge (epochs == grace_period) Ray's ASHAScheduler is built as the Tuner builds
    it: what the check lets through, the scheduler takes."""
    from ray.tune.schedulers import ASHAScheduler

    from difftune.search.space.spec import load_space, parse_set

    space = load_space("linear", overrides=parse_set(["epochs=7"]),
                       search_overrides={"image_rungs": []})  # ASHA over epochs
    s = space.search
    ASHAScheduler(time_attr="training_iteration", max_t=space.max_epochs(),
                  grace_period=int(s["grace_period"]), reduction_factor=float(s["reduction_factor"]))


def test_a_bad_number_in_the_environment_is_one_line(tmp_path, monkeypatch, capsys):
    """$DIFFTUNE_MLFLOW_WAIT_S is read when the search ends: it is checked before it starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFTUNE_MLFLOW_WAIT_S", "five minutes")
    assert main(["search"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["difftune search: error: $DIFFTUNE_MLFLOW_WAIT_S='five minutes' is invalid; "
                   "allowed: a number >= 0"]
    assert list(tmp_path.iterdir()) == []


def test_export_of_an_experiment_without_finished_trials(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    client.create_run(exp, tags={"difftune.role": "search"})
    rc = main(["export", "--experiment", "empty", "--tracking-uri", uri,
               "--out", str(tmp_path / "best.yaml")])
    assert rc == 2
    assert "has no finished trial to export" in capsys.readouterr().err
    assert not (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize("argv", [["search", "--help"], ["--help"]])
def test_help_explains(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: difftune" in out


COMMANDS = ["search", "plan", "export", "train", "predict", "ui", "extract", "cache ls", "cache rm",
            "pretrain", "probe"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_default_once_and_never_none(command, capsys):
    assert main([*command.split(), "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text and "default: []" not in text
    options = re.split(r" (?=-{1,2}[a-z][\w-]* )", text.split("options:", 1)[1])
    for option in options:
        assert option.count("default") <= 1, option


def test_required_options_show_no_default(capsys):
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT output YAML file" in text and "--out OUT output YAML file (default" not in text


def test_a_space_number_written_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads 1e-3 as a string; a space file reads it as the number it is."""
    import optuna

    from difftune.search.space.spec import load_space, parse_set

    path = tmp_path / "lr.yaml"
    path.write_text("model: demo\nsearch: {trials: 1e1}\n"
                    "params:\n  lr: {float: [1e-3, 5e-2], log: true}\n  t: {int: [0, 1e2]}\n")
    space = load_space(str(path), overrides=parse_set(["momentum=9e-1"]))
    assert space.params["lr"] == {"float": [1e-3, 5e-2], "log": True}
    assert space.params["t"] == {"int": [0, 100]} and space.search["trials"] == 10
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trial = study.ask()
    const = space.define_by_run(trial)
    assert 1e-3 <= trial.params["lr"] <= 5e-2 and isinstance(trial.params["t"], int)
    assert const["momentum"] == 0.9
