"""Every mistake a user can make ends in one clear line naming the setting and what is
allowed, exit code 2, and nothing written: no MLflow store, no cache, no Tune storage."""

from __future__ import annotations

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
    (tmp / "noclasses" / "train").mkdir(parents=True)
    (tmp / "noclasses" / "val").mkdir(parents=True)
    other = {"weight": torch.zeros(3, 3)}
    torch.save(other, tmp / "other.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Pickled()}, tmp / "pickled.pt")
    s = ["search"]
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
        assert err[0].startswith(f"difftune {argv[0]}: error: ")
        assert sorted(p.name for p in work.iterdir()) == [], argv  # nothing written
    assert not (tmp_path / "x.yaml").exists()


def test_export_of_an_experiment_without_finished_trials(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("empty")
    client.create_run(exp, tags={"difftune.role": "search"})
    rc = main(["export", "--experiment", "empty", "--tracking-uri", uri,
               "--out", str(tmp_path / "best.yaml")])
    assert rc == 2
    assert "has no finished trial to export" in capsys.readouterr().err
    assert not (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize("argv", [["search", "--help"], ["--help"]])
def test_help_explains(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: difftune" in out
