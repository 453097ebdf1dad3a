"""Paths a user gives relative to the directory they run difftune in (a checkpoint, an
ImageFolder, a label-fraction file, the stores) work although trials run in Ray's working
directories: each is resolved once, on the driver (issue 22)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from difftune.search.space.spec import load_space
from difftune.trainables.data.datasets import load_dataset
from difftune.trainables.model.unet import DEMO_CHECKPOINT

SPACE = """
search: {trials: 2, seed: 0, max_concurrent: 1, grace_period: 1, cpus_per_trial: 1}
fixed: {head: linear, epochs: 1, batch_size: 16, pool: 1, t: 10, momentum: 0.9,
        label_fraction: keep.txt}
params:
  block: {choice: [7, 10]}
  lr: {float: [0.01, 0.1], log: true}
"""


def image_folder(root, per_class: int = 8, classes: int = 3) -> list[str]:
    """An ImageFolder with ``train/`` and ``val/`` of digits PNGs; the train files' paths
    relative to ``train/``."""
    ds, _ = load_dataset("digits", split="train", image_size=16)
    counts: dict[str, int] = {}
    train = []
    for i in range(len(ds)):
        x, y = ds[i]
        if y >= classes or counts.get(f"{y}", 0) >= 2 * per_class:
            continue
        n = counts[f"{y}"] = counts.get(f"{y}", 0) + 1
        split = "train" if n <= per_class else "val"
        folder = root / split / f"class{y}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        if split == "train":
            train.append(f"class{y}/{i}.png")
        if len(counts) == classes and all(v == 2 * per_class for v in counts.values()):
            break
    return train


def test_load_space_makes_user_paths_absolute_and_keeps_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(DEMO_CHECKPOINT, tmp_path / "mine.pt")
    shutil.copy(DEMO_CHECKPOINT.with_suffix(".yaml"), tmp_path / "mine.yaml")
    (tmp_path / "keep.txt").write_text("x.png\n")
    space = load_space("demo", model="mine.pt", data="digits",
                       overrides={"label_fraction": "keep.txt"})
    assert space.model == str(tmp_path / "mine.pt") and space.data == "digits"
    assert space.fixed["label_fraction"] == str(tmp_path / "keep.txt")
    preset = load_space("demo", overrides={"label_fraction": 0.5})
    assert preset.model == "demo" and preset.fixed["label_fraction"] == 0.5


def test_search_with_relative_checkpoint_data_and_stores_finishes(ray_session, tmp_path):
    """Run from the folder that holds them: `--model mine.pt --data data`, a space whose
    label_fraction is `keep.txt`, and relative stores."""
    shutil.copy(DEMO_CHECKPOINT, tmp_path / "mine.pt")
    shutil.copy(DEMO_CHECKPOINT.with_suffix(".yaml"), tmp_path / "mine.yaml")
    train = image_folder(tmp_path / "data")
    (tmp_path / "keep.txt").write_text("\n".join(train[::2]) + "\n")
    (tmp_path / "s.yaml").write_text(SPACE)
    address = ray_session.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "difftune", "search", "--space", "s.yaml", "--model", "mine.pt",
         "--data", "data", "--experiment", "rel", "--tracking-uri", "sqlite:///mlflow.db",
         "--storage", "runs", "--cache", "cache", "--address", address],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("rel")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), \
        [(r.info.status, r.data.tags.get("error")) for r in trials]
    assert all(r.data.params["model"] == str(tmp_path / "mine.pt") for r in trials)
    assert (tmp_path / "cache").is_dir() and (tmp_path / "runs").is_dir()
