"""Datasets: scikit-learn's digits (built in, no download) and ImageFolder trees.

Every dataset yields ``(image [3 x H x W] in [-1, 1], label)``. A label-fraction subset is
a ``torch.utils.data.Subset`` whose ``indices`` are positions in the full split, so that the
seeded noise of an image (keyed by that index) does not depend on the subset.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError):
    """The data a user asked for is missing or malformed (a user error, exit code 2)."""


class TensorImages(Dataset):
    """Images held in memory as one ``[N x 3 x H x W]`` tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _digits(split: str, image_size: int) -> TensorImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        idx, test_size=0.2, stratify=digits.target, random_state=0
    )
    keep = np.sort(train_idx if split == "train" else val_idx)
    x = torch.from_numpy(digits.images[keep]).float() / 16.0 * 2.0 - 1.0  # [N x 8 x 8]
    x = x[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False).clamp(-1, 1)
    x = x.repeat(1, 3, 1, 1).contiguous()
    labels = torch.from_numpy(digits.target[keep]).long()
    return TensorImages(x, labels, [str(c) for c in range(10)])


def _image_folder(root: Path, split: str, image_size: int) -> Dataset:
    from torchvision import datasets

    split_dir = _check_split(root, split)
    try:
        ds = datasets.ImageFolder(str(split_dir), transform=image_transform(image_size),
                                  loader=_rgb_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data folder {split_dir}: {exc}") from None
    train_dir = root / "train"
    if split != "train" and train_dir.is_dir():
        # labels index the *train* classes in every split: a val/ lacking a class must not
        # shift every later label by one
        train_classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
        extra = sorted(set(ds.classes) - set(train_classes))
        if extra:
            raise DataError(f"data folder {split_dir} has classes that train/ lacks: {extra}")
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
    from torchvision import transforms

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
    return sorted(d.name for d in os.scandir(_check_split(Path(name_or_path), "train"))
                  if d.is_dir())


def _check_split(root: Path, split: str) -> Path:
    """The split folder of an ImageFolder root; a clear error if it or its classes are missing."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"data folder {root} has no {split}/ subfolder (expected {root}/train/CLASS/*.jpg "
            f"and {root}/val/CLASS/*.jpg)"
        )
    if not any(d.is_dir() for d in os.scandir(split_dir)):
        raise DataError(f"data folder {split_dir} has no class subfolders (expected {split_dir}/CLASS/*.jpg)")
    return split_dir


def check_data(name_or_path: str) -> None:
    """Check the layout of a dataset cheaply (no image is read): the driver does this before
    any trial starts."""
    if name_or_path == "digits":
        return
    root = Path(name_or_path)
    if not root.is_dir():
        raise DataError(
            f"data {name_or_path!r} is neither 'digits' nor an existing folder with "
            "train/ and val/ ImageFolder trees"
        )
    for split in SPLITS:
        _check_split(root, split)


def _rgb_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image {path} cannot be read ({exc}); remove or replace it") from None


def _subset_indices(targets: list[int], label_fraction: float | str | Path, seed: int,
                    samples: list | None) -> list[int]:
    if isinstance(label_fraction, (str, Path)) and not _is_number(label_fraction):
        path = Path(label_fraction)
        if not path.is_file():
            raise DataError(f"label_fraction file {path} does not exist")
        wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        if samples is None:
            raise DataError("label_fraction as a file list works only with an image folder")
        keep = [i for i, (p, _) in enumerate(samples)
                if os.path.basename(p) in wanted or _rel(p) in wanted]
        if not keep:
            raise DataError(f"label_fraction file {path} names none of the training images")
        return keep
    frac = float(label_fraction)
    if not 0 < frac <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {frac}")
    if frac == 1:
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    targets_arr = np.asarray(targets)
    keep: list[int] = []
    for c in np.unique(targets_arr):
        members = np.flatnonzero(targets_arr == c)
        k = max(1, int(round(frac * len(members))))
        keep.extend(rng.choice(members, size=k, replace=False).tolist())
    return sorted(keep)


def _rel(p: str) -> str:
    parts = Path(p).parts
    return "/".join(parts[-2:])


def _is_number(x: object) -> bool:
    try:
        float(x)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def load_dataset(
    name_or_path: str,
    *,
    split: str,
    image_size: int,
    label_fraction: float | str | None = None,
    seed: int = 0,
) -> tuple[Dataset, list[str]]:
    """Load a split of a dataset.

    :param name_or_path: ``digits`` or a folder with ``train/`` and ``val/`` ImageFolder trees.
    :param split: ``train`` or ``val``.
    :param image_size: side of the square images the U-Net sees.
    :param label_fraction: keep a seeded, stratified fraction of the training labels (or a
        file listing the images to keep); the val split is never subsampled.
    :return: ``(dataset, class_names)``; items are ``(image [3 x H x W] in [-1, 1], label)``.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    if name_or_path == "digits":
        ds: Dataset = _digits(split, image_size)
        classes = ds.classes
        samples = None
    else:
        check_data(name_or_path)
        root = Path(name_or_path)
        ds = _image_folder(root, split, image_size)
        classes, samples = ds.classes, ds.samples
    if label_fraction is not None and split == "train":
        keep = _subset_indices(list(ds.targets), label_fraction, seed, samples)
        ds = Subset(ds, keep)
    return ds, list(classes)


@functools.lru_cache(maxsize=4)
def shared_dataset(data: str, split: str, image_size: int, label_fraction, seed: int
                   ) -> tuple[Dataset, list[str]]:
    """``load_dataset`` memoised per process (a Ray worker runs many trials); read-only."""
    return load_dataset(data, split=split, image_size=image_size,
                        label_fraction=label_fraction, seed=seed)


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


def dataset_indices(ds: Dataset) -> list[int]:
    """Positions of ``ds``'s items in the full split (the keys of their seeded noise)."""
    if isinstance(ds, Subset):
        return list(ds.indices)
    return list(range(len(ds)))


def targets_of(ds: Dataset) -> list[int]:
    """Labels of every item of ``ds`` without loading images."""
    if isinstance(ds, Subset):
        base = targets_of(ds.dataset)
        return [base[i] for i in ds.indices]
    return list(ds.targets)


def class_counts(name_or_path: str, split: str) -> list[int]:
    """Images per class of a split, without reading an image (``difftune plan``)."""
    if name_or_path == "digits":
        targets = np.asarray(_digits(split, 8).targets)
        return np.bincount(targets, minlength=10).tolist()
    split_dir = _check_split(Path(name_or_path), split)
    return [sum(1 for f in os.scandir(d) if f.name.lower().endswith(IMAGE_EXTENSIONS))
            for d in sorted(os.scandir(split_dir), key=lambda d: d.name) if d.is_dir()]


def subset_size(counts: list[int], label_fraction: float | str | None) -> int:
    """Images :func:`load_dataset` keeps of a split with ``counts`` images per class: every
    image without a fraction, a stratified ``round(fraction * n)`` (at least 1) per class
    with one, the lines of a file list."""
    if label_fraction is None:
        return int(sum(counts))
    if not _is_number(label_fraction):
        path = Path(label_fraction)
        if not path.is_file():
            raise DataError(f"label_fraction file {path} does not exist")
        return len({ln.strip() for ln in path.read_text().splitlines() if ln.strip()})
    frac = float(label_fraction)
    if not 0 < frac <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {frac}")
    return int(sum(max(1, int(round(frac * n))) for n in counts if n))


#: how :func:`files_fingerprint` reads a folder: ``size`` (relative paths and sizes) or
#: ``content`` (relative paths and the bytes of every file)
DATA_HASHES = ("size", "content")


def files_fingerprint(name_or_path: str, split: str, *, data_hash: str = "size") -> str:
    """A fingerprint of the files of one split: their paths relative to the split folder and
    their sizes (``data_hash="content"``: their bytes), never their modification times, so a
    copy of the data in another place or on another node fingerprints the same. The one walk
    over the data a search makes: the driver computes it and hands it to the trials."""
    if data_hash not in DATA_HASHES:
        raise DataError(f"--data-hash {data_hash!r} is unknown; allowed: {list(DATA_HASHES)}")
    h = hashlib.sha256(f"files|{split}|{data_hash}".encode())
    if name_or_path == "digits":
        import sklearn

        h.update(f"digits|sklearn-{sklearn.__version__}".encode())
        return h.hexdigest()[:16]
    root = Path(name_or_path) / split
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(f"{rel_dir}/{name}|{os.stat(p).st_size}\n".encode())
            if data_hash == "content":
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


def data_fingerprint(name_or_path: str, *, split: str, image_size: int,
                     label_fraction: float | str | None = None, seed: int = 0,
                     files: str | None = None, data_hash: str = "size") -> str:
    """A fingerprint of a dataset split as a trial reads it: its files
    (:func:`files_fingerprint`, or ``files`` when the driver computed it already), the
    transform (image size) and the label subset.

    :param files: ``files_fingerprint(name_or_path, split)`` if known (no walk is made).
    """
    h = hashlib.sha256(f"{split}|{image_size}|{label_fraction}|{seed}".encode())
    if label_fraction is not None and not _is_number(label_fraction) \
            and Path(label_fraction).is_file():
        h.update(Path(label_fraction).read_bytes())  # a file list: what it lists, not its name
    h.update((files or files_fingerprint(name_or_path, split, data_hash=data_hash)).encode())
    return h.hexdigest()[:16]
