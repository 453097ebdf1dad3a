"""The champion classifier (search.classifier, trainables.classify) without Ray: a head trained
in-process, logged by ``log_champion`` into a real sqlite MLflow store, and run on PNG files
by ``difftune predict`` for a feature head (DifFormer) and a live head (DifFeed); a user's
U-Net is referenced by path and verified by its fingerprint."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from difftune.search.cli import main
from difftune.search.records.champion import log_champion
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import load_dataset, load_image
from difftune.trainables.heads import build_head, head_kind
from difftune.trainables.heads.checkpoint import save_head
from difftune.trainables.model.classify import classify
from difftune.trainables.model.features import block_shapes
from difftune.trainables.model.unet import build, shared_unet
from difftune.trainables.pipeline import clamp_requests, run_trial

LINEAR = TrialConfig(head="linear", block=10, t=30, pool=2, epochs=2, lr=0.05, momentum=0.9,
                     batch_size=64)
SMALL = dict(dim=32, heads=2, depth=1, pre_pool=4)
UNTRAINED = {  # a head that reads several maps, and one that runs the U-Net itself
    "difformer": TrialConfig(head="difformer", blocks=[7, 10], timesteps=[10, 30], **SMALL),
    "diffeed": TrialConfig(head="diffeed", block=10, t=10, feedback_blocks=[11, 13], **SMALL),
}


def pngs(folder, count: int, image_size: int = 16) -> list[tuple[str, str]]:
    """The first ``count`` digits val images as PNG files: ``(path, true label)``."""
    ds, _ = load_dataset("digits", split="val", image_size=image_size)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        x, y = ds[i]
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        out.append((str(folder / f"{i}.png"), str(y)))
    return out


def shapes_of(cfg: TrialConfig) -> dict:
    """The ``(t, block) -> (C, p, p)`` a feature head of ``cfg`` is built for."""
    model, _ = shared_unet(cfg.model, cfg.checkpoint)
    shapes = block_shapes(model)
    return {(t, b): (shapes[b][0], p, p)
            for t, b, p in clamp_requests(model, head_kind(cfg.head).requests(cfg))}


def register(tmp_path, cfg: TrialConfig, *, train: bool = True) -> tuple[str, float | None]:
    """Train ``cfg`` in-process (or keep its seeded initial head), log it as the champion
    ``c`` of a sqlite store; (tracking URI, val top-1)."""
    shapes, classes, val_top1 = shapes_of(cfg), 10, None
    if train:
        holder: dict = {}
        head, history = run_trial(cfg, on_data=holder.update)
        val_top1 = history[-1]["val_top1"]
        assert holder["shapes"] == shapes and holder["num_classes"] == classes
    else:
        head = build_head(cfg, shapes, classes, unet=shared_unet("demo", None))
    save_head(tmp_path / "ckpt", head, cfg, epoch=cfg.epochs, shapes=shapes,
              num_classes=classes)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("c", artifact_location=str(tmp_path / "artifacts"))
    parent, child = (client.create_run(exp).info.run_id for _ in range(2))
    log_champion(client, tracking_uri=uri, parent_run_id=parent, best_run_id=child,
                 checkpoint_dir=str(tmp_path / "ckpt"), model_name="c",
                 best_config=cfg.to_dict(), metric_value=val_top1 or 0.0)
    return uri, val_top1


def predict(uri: str, paths: list[str], capsys) -> tuple[int, list[list[str]], list[str]]:
    capsys.readouterr()
    rc = main(["predict", *paths, "--model", "models:/c@champion", "--tracking-uri", uri])
    out = capsys.readouterr()
    return rc, [line.split("\t") for line in out.out.strip().splitlines()], \
        out.err.strip().splitlines()


def test_a_champion_scores_on_png_files_as_in_its_trial(tmp_path, capsys):
    uri, val_top1 = register(tmp_path, LINEAR)
    images = pngs(tmp_path / "png", 359)  # the whole val split the trial was scored on
    rc, lines, _ = predict(uri, [p for p, _ in images], capsys)
    assert rc == 0 and [p for p, _, _ in lines] == [p for p, _ in images]
    accuracy = 100 * np.mean([label == truth for (_, label, _), (_, truth) in zip(lines, images, strict=True)])
    # the same images and head, noise keyed by content instead of index: the same score
    assert val_top1 > 80 and abs(accuracy - val_top1) <= 3, (accuracy, val_top1)
    # an image's label does not depend on the batch it comes in
    rc, alone, _ = predict(uri, [images[5][0], images[0][0]], capsys)
    assert rc == 0 and alone == [lines[5], lines[0]]


@pytest.mark.parametrize("head", sorted(UNTRAINED))
def test_a_champion_is_rebuilt_exactly(tmp_path, capsys, head):
    """The registered model, loaded anew, gives the probabilities of the head it was logged
    from (its seeded initial weights) on the same images: for a head reading several maps
    (DifFormer) and one running the U-Net itself (DifFeed)."""
    cfg = UNTRAINED[head]
    uri, _ = register(tmp_path, cfg, train=False)
    images = [p for p, _ in pngs(tmp_path / "png", 8)]
    x = torch.stack([load_image(p, 16) for p in images])
    unet = shared_unet("demo", None)
    expected = classify(unet, build_head(cfg, shapes_of(cfg), 10, unet=unet).eval(), cfg, x)
    mlflow.set_tracking_uri(uri)
    table = mlflow.pyfunc.load_model("models:/c@champion").predict(x.numpy())
    assert np.allclose(table.probability, expected.max(dim=1).values.numpy(), atol=1e-5)
    assert list(table.label) == [str(int(i)) for i in expected.argmax(dim=1)]
    rc, lines, _ = predict(uri, images, capsys)
    assert rc == 0 and [label for _, label, _ in lines] == list(table.label)


def test_a_users_unet_is_verified_by_its_fingerprint(tmp_path, capsys, tiny_flags):
    torch.manual_seed(0)
    model, _ = build(tiny_flags)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_flags))
    uri, _ = register(tmp_path, TrialConfig(model=str(path), block=2, t=10, pool=1, epochs=1,
                                            label_fraction=0.1))
    images = [p for p, _ in pngs(tmp_path / "png", 3)]
    rc, lines, _ = predict(uri, images, capsys)
    assert rc == 0 and len(lines) == 3 and all(label in "0123456789" for _, label, _ in lines)
    torch.manual_seed(1)  # other weights at the same path: refused, not silently used
    torch.save(build(tiny_flags)[0].state_dict(), path)
    rc, lines, err = predict(uri, images, capsys)
    assert rc == 2 and lines == [] and len(err) == 1
    assert f"the champion's U-Net {path} has fingerprint" in err[0] and "trained on" in err[0]
    path.unlink()
    rc, _, err = predict(uri, images, capsys)
    assert rc == 2 and len(err) == 1 and f"the champion's U-Net {path} does not exist" in err[0]
