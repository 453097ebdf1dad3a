"""Reading images: scikit-learn's digits (built in, no download) and ImageFolder trees (an
image that cannot be decoded stops a search, or is skipped), and :func:`load_dataset`, which
serves a split of them: which images each split holds is :mod:`.splits`' concern.

Every dataset yields ``(image [3 x H x W] in [-1, 1], label)``. A split is a
:class:`SplitPart` of a base set (all digits, or one folder); its items keep their positions
in that base set (:func:`dataset_indices`) through holdouts and label-fraction subsets, so the
seeded noise of an image (keyed by that index) never depends on which subset it is in.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difftune.trainables.data.fingerprint import (
    DATA_HASHES,
    data_fingerprint,
    files_fingerprint,
    split_files_fingerprints,
)
from difftune.trainables.data.splits import (
    DEFAULT_HOLDOUT,
    IMAGE_EXTENSIONS,
    SPLIT_SCHEME,
    SPLITS,
    SplitPart,
    check_data,
    class_counts,
    dataset_indices,
    digits_positions,
    holdout_positions,
    label_subset,
    split_dir,
    split_source,
    subset_size,
    targets_of,
)
from difftune.trainables.errors import DataError

__all__ = ["BAD_IMAGES", "DATA_HASHES", "DEFAULT_HOLDOUT", "SPLITS", "SPLIT_SCHEME",
           "CorruptImage", "DataError", "ImageItems", "SplitPart", "TensorImages", "bad_files",
           "check_data", "class_counts", "data_fingerprint", "dataset_indices",
           "files_fingerprint", "holdout_positions", "load_dataset", "shared_dataset",
           "skipped_images", "split_files_fingerprints", "split_source", "subset_size",
           "targets_of"]

logger = logging.getLogger(__name__)

#: what a search does with an image that cannot be decoded: stop (default) or skip it
BAD_IMAGES = ("stop", "skip")


class TensorImages(Dataset):
    """Images held in memory as one ``[N x 3 x H x W]`` tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@functools.lru_cache(maxsize=8)
def _digits_all(image_size: int) -> TensorImages:
    """All 1797 digits, resized to ``image_size``."""
    from sklearn.datasets import load_digits  # scikit-learn only for the digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float() / 16.0 * 2.0 - 1.0  # [N x 8 x 8]
    x = x[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False).clamp(-1, 1)
    x = x.repeat(1, 3, 1, 1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    return TensorImages(x, labels, [str(c) for c in range(10)])


def _digits(split: str, image_size: int) -> SplitPart:
    return SplitPart(_digits_all(image_size), digits_positions(split))


def _image_folder(root: Path, split: str, image_size: int, holdout: float,
                  bad_images: str) -> Dataset:
    folder, part = split_source(root, split)
    ds = _folder(root, folder, image_size, bad_images)
    if part == "all":
        return SplitPart(ds, range(len(ds)))
    fit, held = holdout_positions(ds.targets, holdout)
    return SplitPart(ds, fit if part == "fit" else held)


@functools.lru_cache(maxsize=8)
def _folder(root: Path, folder: str, image_size: int, bad_images: str) -> Dataset:
    from torchvision import datasets  # torchvision only for an ImageFolder

    folder_dir = split_dir(root, folder)
    try:
        ds = datasets.ImageFolder(str(folder_dir), transform=image_transform(image_size),
                                  loader=_rgb_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data folder {folder_dir}: {exc}") from None
    if bad_images == "skip":
        bad = set(bad_files(str(root), folder))
        if bad:
            ds.samples = ds.imgs = [(p, y) for p, y in ds.samples if p not in bad]
            ds.targets = [y for _, y in ds.samples]
    train_dir = root / "train"
    if folder != "train" and train_dir.is_dir():
        # labels index the *train* classes in every split: a val/ lacking a class must not
        # shift every later label by one
        train_classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
        extra = sorted(set(ds.classes) - set(train_classes))
        if extra:
            raise DataError(f"data folder {folder_dir} has classes that train/ lacks: {extra}")
        if ds.classes != train_classes:
            to_train = {i: train_classes.index(c) for i, c in enumerate(ds.classes)}
            ds.samples = ds.imgs = [(p, to_train[y]) for p, y in ds.samples]
            ds.targets = [y for _, y in ds.samples]
            ds.classes = train_classes
            ds.class_to_idx = {c: i for i, c in enumerate(train_classes)}
    return ds


def image_transform(image_size: int):
    """A PIL RGB image -> [3 x image_size x image_size] in [-1, 1] (resize the short side,
    centre crop): what every image of a folder dataset, and every image a champion
    classifies, goes through."""
    from torchvision import transforms  # torchvision only where images are read

    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """One image file as a folder dataset serves it: [3 x image_size x image_size] in [-1, 1];
    :class:`DataError` naming the file when it cannot be read."""
    if not Path(path).is_file():
        raise DataError(f"image {path} does not exist")
    return image_transform(image_size)(_rgb_loader(str(path)))


def class_names(name_or_path: str) -> list[str]:
    """The class names of a dataset, in label order, without reading an image."""
    if name_or_path == "digits":
        return [str(c) for c in range(10)]
    return sorted(d.name for d in os.scandir(split_dir(Path(name_or_path), "train"))
                  if d.is_dir())


class CorruptImage(DataError):
    """An image file that cannot be decoded: deterministic, so a search stops at once
    (unless ``bad_images: skip``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"image {path} cannot be decoded ({reason}); remove or replace it, "
                         "or set bad_images: skip in the space to skip such images")
        self.path = path


def _rgb_loader(path: str):
    from PIL import Image  # Pillow only where image files are read

    # reading the bytes may hit a transient I/O error (an OSError that is retried); decoding
    # them fails the same way every time
    with open(path, "rb") as f:
        data = f.read()
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(path, str(exc).splitlines()[0][:200] or type(exc).__name__) from None


@functools.lru_cache(maxsize=8)
def bad_files(root: str, folder: str) -> tuple[str, ...]:
    """Image files under ``root/folder`` that cannot be opened as images (a header check and
    PIL's ``verify``, no full decode): what ``bad_images: skip`` leaves out."""
    from PIL import Image  # Pillow only where image files are read

    bad = []
    for dirpath, dirnames, filenames in os.walk(Path(root) / folder):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            try:
                with Image.open(path) as im:
                    im.verify()
            except (OSError, SyntaxError, ValueError):
                bad.append(path)
    if bad:
        logger.warning("%d image(s) under %s/%s cannot be read and are skipped (first: %s)",
                       len(bad), root, folder, bad[0])
    return tuple(bad)


def skipped_images(name_or_path: str) -> list[str]:
    """Every image of a folder dataset that ``bad_images: skip`` leaves out (all splits)."""
    if name_or_path == "digits":
        return []
    root = Path(name_or_path)
    folders = sorted({split_source(root, s)[0] for s in SPLITS})
    return [p for f in folders for p in bad_files(str(root), f)]


def check_bad_images(mode: str) -> str:
    if mode not in BAD_IMAGES:
        raise DataError(f"bad_images={mode!r} is invalid; allowed: {list(BAD_IMAGES)} (stop: a "
                        "search stops at the first unreadable image; skip: leave them out)")
    return mode


def load_dataset(
    name_or_path: str,
    *,
    split: str,
    image_size: int,
    label_fraction: float | str | None = None,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
    bad_images: str = "stop",
) -> tuple[SplitPart, list[str]]:
    """Load a split of a dataset.

    :param name_or_path: ``digits`` or a folder with ``train/`` and ``val/`` (and optionally
        ``test/``) ImageFolder trees.
    :param split: ``train`` (fits heads), ``val`` (selects) or ``test`` (reported).
    :param image_size: side of the square images the U-Net sees.
    :param label_fraction: keep a seeded, stratified fraction of the training labels (or a
        file listing the images to keep); val and test are never subsampled.
    :param holdout: the share of ``train/`` held out as ``val`` (a folder without ``test/``).
    :param bad_images: ``stop``: an unreadable image raises :class:`CorruptImage` when read;
        ``skip``: such images are left out of every split.
    :return: ``(dataset, class_names)``; items are ``(image [3 x H x W] in [-1, 1], label)``.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    check_bad_images(bad_images)
    if name_or_path == "digits":
        ds = _digits(split, image_size)
    else:
        check_data(name_or_path)
        ds = _image_folder(Path(name_or_path), split, image_size, float(holdout), bad_images)
    if label_fraction is not None and split == "train":
        keep = label_subset(ds.targets, label_fraction, seed, ds.samples)
        ds = SplitPart(ds.base, [ds.positions[k] for k in keep])
    return ds, list(ds.classes)


@functools.lru_cache(maxsize=8)
def shared_dataset(data: str, split: str, image_size: int, label_fraction, seed: int,
                   holdout: float = DEFAULT_HOLDOUT, bad_images: str = "stop"
                   ) -> tuple[SplitPart, list[str]]:
    """``load_dataset`` memoised per process (a Ray worker runs many trials); read-only."""
    return load_dataset(data, split=split, image_size=image_size,
                        label_fraction=label_fraction, seed=seed, holdout=holdout,
                        bad_images=bad_images)


class ImageItems(Dataset):
    """Item ``i`` of ``ds`` as ``({"image": [3 x H x W], "index": dataset index}, label)``:
    what a head that runs the U-Net itself reads (the index keys the image's seeded noise)."""

    def __init__(self, ds: Dataset):
        self.ds, self.indices = ds, dataset_indices(ds)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor | int], int]:
        x, y = self.ds[i]
        return {"image": x, "index": self.indices[i]}, int(y)


