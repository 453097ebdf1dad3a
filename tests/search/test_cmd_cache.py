"""``difftune extract`` and ``difftune cache ls|du|rm`` (search.cmd_extract, search.cmd_cache),
run in-process through ``difftune.search.cli.main``."""

from __future__ import annotations

import re

import pytest

from difftune.search.cli import main

EXTRACT = ["extract", "--model", "demo", "--data", "digits", "--timesteps", "90,150",
           "--blocks", "2,3", "--pool", "2", "--splits", "train", "--label-fraction", "0.03"]


def summary(out: str) -> tuple[int, int, int]:
    """(forward batches, entries reused, entries written) from extract's last line."""
    m = re.search(r"extract: (\d+) U-Net forward batches .*reused (\d+), written (\d+)",
                  out.strip().splitlines()[-1])
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def test_extract_twice_runs_no_forward_pass_the_second_time(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main([*EXTRACT, "--cache", cache]) == 0
    assert summary(capsys.readouterr().out) == (2, 0, 4)  # one batch per timestep
    assert main([*EXTRACT, "--cache", cache]) == 0
    assert summary(capsys.readouterr().out) == (0, 4, 0)

    assert main(["cache", "ls", "--cache", cache]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert sorted((r[4], r[6], r[7]) for r in rows) == [
        ("150", "2", "2"), ("150", "3", "2"), ("90", "2", "2"), ("90", "3", "2")]
    assert all(r[0] == "demo" and r[2] == "digits" and r[3] == "train" for r in rows)
    assert out.splitlines()[-1].startswith("4 entries")

    assert main(["cache", "du", "--cache", cache]) == 0
    assert re.match(r"\d+\.\d KiB in ", capsys.readouterr().out)

    assert main(["cache", "rm", "--cache", cache, "--t", "150", "--block", "3"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entries")
    assert main([*EXTRACT, "--cache", cache]) == 0  # only the removed entry is redone
    assert summary(capsys.readouterr().out) == (1, 3, 1)

    assert main(["cache", "rm", "--cache", cache, "--all"]) == 0
    assert capsys.readouterr().out.startswith("removed 4 entries")
    assert main(["cache", "ls", "--cache", cache]) == 0
    assert capsys.readouterr().out.startswith("0 entries")


def test_cache_location_comes_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "env-cache"))
    assert main([*EXTRACT[:6], "90", "--blocks", "2", *EXTRACT[9:]]) == 0
    assert summary(capsys.readouterr().out) == (1, 0, 1)
    assert (tmp_path / "env-cache").is_dir()
    assert main(["cache", "ls"]) == 0
    assert "1 entries" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "2,40"], "block 40 is out of range; this model has blocks 1..19"),
    (["--timesteps", "1000"], "timestep t=1000 is out of range"),
    (["--pool", "0"], "argument --pool: 0 is out of range; allowed: an integer >= 1"),
    (["--blocks", "2,x"], "--blocks must be comma-separated integers"),
    (["--splits", "holdout"], "--splits 'holdout' is invalid"),
])
def test_extract_refuses_bad_settings_before_doing_anything(tmp_path, capsys, argv, message):
    cache = tmp_path / "cache"
    args = list(EXTRACT)
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        args[args.index(flag) + 1] = value
    assert main([*args, "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not cache.exists()


def test_cache_rm_needs_a_filter(tmp_path, capsys):
    assert main(["cache", "rm", "--cache", str(tmp_path)]) == 2
    assert "--all" in capsys.readouterr().err
