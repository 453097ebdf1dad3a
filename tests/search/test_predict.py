"""A search on a folder dataset of PNG files, end to end: it records into its own experiment
(not the demo's), its closing table shows what each trial ran, and its registered champion
classifies PNG files (``difftune predict``) with a signature and an input example."""

from __future__ import annotations

import contextlib
import io
import re

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from difftune.search.cli import main
from difftune.trainables.data.datasets import load_dataset

CLASSES = ("0", "1", "2")
EXPERIMENT = "difftune-tiny-digits3"  # difftune-SPACE-DATA
#: a trial with lr 1e-6 learns nothing in its first epoch: ASHA stops it there, so the table
#: must show 1 epoch for it while its config says 3
SPACE = """
model: demo
search: {trials: 4, seed: 0, max_concurrent: 1, grace_period: 1, reduction_factor: 2}
fixed: {head: linear, epochs: 3, block: 10, t: 20, pool: 1, momentum: 0.9, batch_size: 32,
        step_size: 3}
params:
  lr: {choice: [0.05, 0.000001]}
paper_config: {head: linear, block: 10, t: 20, pool: 1, lr: 0.05}
"""


def write_pngs(root, split: str, per_class: int) -> list[tuple[str, str]]:
    """Digits 0-2 of one split as 16-px PNG files in ``root/split/CLASS/``."""
    ds, _ = load_dataset("digits", split=split, image_size=16)
    counts = dict.fromkeys(CLASSES, 0)
    out = []
    for i in range(len(ds)):
        x, y = ds[i]
        label = str(y)
        if label not in counts or counts[label] == per_class:
            continue
        counts[label] += 1
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        path = folder / f"{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        out.append((str(path), label))
    return out


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    data = root / "digits3"
    write_pngs(data, "train", 40)
    val = write_pngs(data, "val", 12)
    (root / "tiny.yaml").write_text(SPACE)
    uri = f"sqlite:///{root}/mlflow.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["search", "--space", str(root / "tiny.yaml"), "--data", str(data),
                   "--tracking-uri", uri, "--storage", str(root / "runs"),
                   "--cache", str(root / "cache")])
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, [e.name for e in client.search_experiments()]
    children = [r for r in client.search_runs([exp.experiment_id], max_results=100)
                if r.data.tags.get("difftune.role") == "trial"]
    return {"uri": uri, "client": client, "val": val, "children": children,
            "stdout": out.getvalue()}


def test_a_folder_search_records_into_its_own_experiment(searched):
    client = searched["client"]
    assert client.get_experiment_by_name("difftune-demo") is None
    assert [m.name for m in client.search_registered_models()] == [EXPERIMENT]
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    scores = {r.info.run_id: r.data.metrics["val_top1"] for r in searched["children"]}
    assert scores[version.run_id] == max(scores.values())  # equal configs tie


def test_closing_table_shows_the_epochs_each_trial_ran_and_whole_run_ids(searched):
    client = searched["client"]
    ran = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_top1"))
           for r in searched["children"]}
    assert 1 in ran.values() and 3 in ran.values()  # ASHA stopped one at epoch 1
    lines = searched["stdout"].split("best trials of experiment")[1].splitlines()
    header = lines[1].split()
    # the champion's one test evaluation adds test_top1 ("-" for the other trials)
    assert header[:4] == ["val_top1", "val_top5", "test_top1", "epochs"]
    assert header[-1] == "run_id"
    rows = [line.split() for line in lines[2:2 + len(ran)]]
    assert {row[-1]: int(row[3]) for row in rows} == ran  # 32-character ids, epochs ran
    assert sum(row[2] != "-" for row in rows) == 1
    assert all(re.fullmatch(r"[0-9a-f]{32}", row[-1]) for row in rows)


def test_the_champion_has_a_signature_and_an_input_example(searched):
    mlflow.set_tracking_uri(searched["uri"])
    uri = f"models:/{EXPERIMENT}@champion"
    local = mlflow.artifacts.download_artifacts(uri)
    model = mlflow.models.Model.load(local)
    (spec,) = model.signature.inputs.inputs
    assert spec.shape == (-1, 3, 16, 16) and spec.type == np.dtype("float32")
    assert model.signature.outputs.input_names() == ["label", "probability"]
    example = model.load_input_example(local)
    assert example.shape == (2, 3, 16, 16) and example.dtype == np.float32
    assert model.metadata["difftune"]["unet"]["model"] == "demo"  # bundled: the demo U-Net
    table = mlflow.pyfunc.load_model(uri).predict(example)
    assert list(table.columns) == ["label", "probability"] and set(table.label) <= set(CLASSES)


def test_predict_prints_a_label_per_png(searched, capsys):
    paths = [p for p, _ in searched["val"]]
    truth = dict(searched["val"])
    capsys.readouterr()
    assert main(["predict", *paths, "--model", f"models:/{EXPERIMENT}@champion",
                 "--tracking-uri", searched["uri"]]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for p, _, _ in lines] == paths
    assert all(label in CLASSES and 0 < float(prob) <= 1 for _, label, prob in lines)
    accuracy = 100 * np.mean([truth[p] == label for p, label, _ in lines])
    best = max(r.data.metrics["val_top1"] for r in searched["children"])
    # the same val images as the search's, with noise keyed by content instead of index
    assert accuracy >= 80 and abs(accuracy - best) <= 12, (accuracy, best)
    # a registered model name means its champion; one image alone gets the same label
    assert main(["predict", paths[0], "--model", EXPERIMENT,
                 "--tracking-uri", searched["uri"]]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == lines[0][:2]
