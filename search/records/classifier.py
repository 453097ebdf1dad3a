"""The champion as an image classifier: an MLflow pyfunc model that takes a batch of images
and returns a label per image.

It holds the trained head (the head checkpoint format) and names the U-Net the head was
trained on in its metadata: the demo U-Net is bundled in the model; any other checkpoint is
referenced by its path and verified by its fingerprint
(:func:`~difftune.trainables.model.unet.model_fingerprint`) when the model loads. Predicting runs
:func:`~difftune.trainables.model.classify.classify`: noise, U-Net, the features the head reads,
the head.

Input: float32 images ``[N x 3 x S x S]`` in [-1, 1] (S: the U-Net's image size; see the
signature). Output: a table with ``label`` (the class name) and ``probability``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from difftune.trainables.errors import UserError

logger = logging.getLogger(__name__)

#: the artifact path of the classifier on the champion's run
NAME = "classifier"
META = "classifier.json"
#: the model's code (MLflow "models from code": nothing is pickled); the difftune package
#: ships beside it
MODEL_CODE = """# difftune's champion classifier (see difftune.search.records.classifier)
import mlflow

from difftune.search.records.classifier import ChampionClassifier

mlflow.models.set_model(ChampionClassifier())
"""


class ChampionClassifier(mlflow.pyfunc.PythonModel):
    """Images -> labels with a trained head on its frozen U-Net (see the module docstring)."""

    def load_context(self, context) -> None:
        from difftune.trainables.config import TrialConfig
        from difftune.trainables.heads import build_head
        from difftune.trainables.heads.checkpoint import read_checkpoint

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classes = meta["classes"]
        self.unet = load_champion_unet(meta["unet"], context.artifacts.get("unet"), self.device)
        state, head_meta = read_checkpoint(context.artifacts["head"])
        self.cfg = TrialConfig.from_dict(head_meta["config"])
        shapes = {tuple(k): tuple(v) for k, v in head_meta["shapes"]}
        self.head = build_head(self.cfg, shapes, head_meta["num_classes"], unet=self.unet)
        self.head.load_state_dict(state["head"])
        self.head.to(self.device).eval()

    @property
    def image_size(self) -> int:
        return int(self.unet[0].image_size)

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        """:param model_input: float32 images [N x 3 x S x S] in [-1, 1].
        :return: a DataFrame with ``label`` and ``probability`` per image."""
        from difftune.trainables.model.classify import classify

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        probs = classify(self.unet, self.head, self.cfg, images)
        best = probs.argmax(dim=1) if len(probs) else torch.empty(0, dtype=torch.long)
        return pd.DataFrame({"label": [self.classes[int(i)] for i in best],
                             "probability": [float(probs[r, i]) for r, i in enumerate(best)]})


def load_champion_unet(unet: dict[str, Any], bundled: str | None, device: str):
    """The U-Net a champion names: the bundled copy, or the referenced checkpoint once its
    fingerprint matches the one recorded (a :class:`UserError` naming both otherwise)."""
    from difftune.trainables.model.unet import load_unet, model_fingerprint

    if bundled is not None:
        path = Path(bundled) / Path(unet["checkpoint_file"]).name
        return load_unet(str(path), device=device)
    model, ckpt = unet["model"], unet.get("checkpoint")
    where = ckpt or model
    if where != "paper256" and not Path(where).is_file():
        raise UserError(f"the champion's U-Net {where} does not exist: put the checkpoint the "
                        "head was trained with at that path")
    found = model_fingerprint(model, checkpoint=ckpt)
    if found != unet["fingerprint"]:
        raise UserError(f"the champion's U-Net {where} has fingerprint {found}, but the head was "
                        f"trained on fingerprint {unet['fingerprint']}: put the checkpoint it "
                        "was trained with at that path")
    return load_unet(model, checkpoint=ckpt, device=device)


def signature(image_size: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size))]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))


def log_classifier(head: torch.nn.Module, cfg, meta: dict[str, Any], *, stage: Path,
                   code_path: Path, examples: int = 2) -> Any:
    """Log the champion classifier of a trained head on the active MLflow run.

    :param head: the trained head; :param cfg: its TrialConfig; :param meta: its checkpoint
        metadata (``shapes``, ``num_classes``).
    :param stage: an empty scratch folder; :param code_path: the difftune package to ship.
    :return: MLflow's ModelInfo (``model_uri`` is what gets registered).
    """
    from difftune.trainables.data.datasets import class_names, load_dataset
    from difftune.trainables.heads.checkpoint import save_head
    from difftune.trainables.model.unet import DEMO_CHECKPOINT, model_fingerprint, model_geometry

    stage.mkdir(parents=True, exist_ok=True)
    head_dir = stage / "head"
    shapes = {tuple(k): tuple(v) for k, v in meta["shapes"]}
    save_head(head_dir, head, cfg, epoch=int(meta.get("epoch", 0)), shapes=shapes,
              num_classes=int(meta["num_classes"]))
    unet = {"model": cfg.model, "checkpoint": cfg.checkpoint,
            "fingerprint": model_fingerprint(cfg.model, checkpoint=cfg.checkpoint)}
    artifacts = {"head": str(head_dir), "meta": str(stage / META)}
    if cfg.model == "demo" and cfg.checkpoint is None:  # bundled: a 7 MB model
        bundle = stage / "unet"
        bundle.mkdir()
        for f in (DEMO_CHECKPOINT, DEMO_CHECKPOINT.with_suffix(".yaml")):
            shutil.copy2(f, bundle / f.name)
        unet["checkpoint_file"] = DEMO_CHECKPOINT.name
        artifacts["unet"] = str(bundle)
    else:
        for key in ("model", "checkpoint"):
            if unet[key] and Path(unet[key]).is_file():
                unet[key] = str(Path(unet[key]).resolve())
    classes = class_names(cfg.data)
    if len(classes) != int(meta["num_classes"]):
        raise UserError(f"data {cfg.data} has {len(classes)} classes but the champion head "
                        f"has {meta['num_classes']}: was the data changed during the search?")
    (stage / META).write_text(json.dumps({"unet": unet, "classes": classes}, indent=1))
    size = model_geometry(cfg.model, cfg.checkpoint).image_size
    val, _ = load_dataset(cfg.data, split="val", image_size=size, holdout=cfg.holdout,
                          bad_images=cfg.bad_images)
    example = np.stack([val[i][0].numpy() for i in range(min(examples, len(val)))])
    code = stage / "champion_classifier.py"
    code.write_text(MODEL_CODE)
    return mlflow.pyfunc.log_model(
        name=NAME, python_model=str(code), artifacts=artifacts,
        code_paths=[str(code_path)], signature=signature(size), input_example=example,
        pip_requirements=["torch", "torchvision", "guided-diffusion-sdk", "pandas", "pyyaml"],
        metadata={"difftune": {"unet": unet, "head": cfg.head, "classes": classes,
                               "image_size": size}})


def predict_images(model_uri: str, paths: list[str]) -> list[tuple[str, str, float]]:
    """``(path, label, probability)`` per image file, classified by the MLflow model at
    ``model_uri`` (the tracking URI must be set)."""
    from difftune.trainables.data.datasets import load_image

    model = load_model(model_uri)
    size = model.unwrap_python_model().image_size
    images = torch.stack([load_image(p, size) for p in paths]).numpy()
    table = model.predict(images)
    return [(p, str(r.label), float(r.probability)) for p, r in zip(paths, table.itertuples(), strict=True)]


def load_model(model_uri: str):
    """The pyfunc model at ``model_uri``; one clear line when it is not there."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {model_uri} cannot be loaded: {first}") from None
