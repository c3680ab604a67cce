"""Datasets read from class-folder trees: any image folder, and ImageNet100(-S)."""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from adios_pl.backend import rank_zero_warn
from adios_pl.data.base import SSLDataModule
from adios_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from adios_pl.errors import ConfigurationError, UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = "<dir>/<class>/<image>.jpg (class folders) or <dir>/<image>.jpg (unlabelled)"


class CorruptImageError(UserInputError, RuntimeError):
    """An image file that PIL cannot decode."""


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image.

    Grayscale, palette and RGBA images are converted; 16- and 32-bit images are scaled to 8 bits
    first (a plain conversion would clip them to white), by their bit depth, not their values, so
    a dark 16-bit image stays dark. An integer image whose file does not say its depth (Pillow's
    32-bit mode "I" also holds 16-bit data) takes the smallest of 8, 16 and 31 bits (mode "I" is
    signed) that holds its values.

    Raises:
        CorruptImageError: naming the file, when it cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image: Image.Image = opened
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.nan_to_num(np.asarray(image, dtype=np.float64))
                peak = float(array.max())
                if image.mode == "F":  # float images: [0, 1] as is, otherwise scaled by their maximum
                    top = 1.0 if peak <= 1.0 else peak
                else:  # Pillow before 10.3 opens 16-bit PNGs as "I" (a PNG holds 1 to 16 bits)
                    sixteen = image.mode.startswith("I;16") or image.format == "PNG"
                    top = 65535.0 if sixteen or peak > 255 else 255.0
                    if peak > 65535:
                        top = 2.0**31 - 1
                image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"cannot read image file {path}: {error}") from error


#: Folders that are never classes: hidden ones and those archivers and tools leave behind.
SYSTEM_FOLDERS = ("__MACOSX", "__pycache__", "@eaDir", "$RECYCLE.BIN", "System Volume Information")


def _is_system(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_FOLDERS


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def scan_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Image files under ``root``: ``([(path, target)], class_names)``.

    Class folders give targets in sorted (or the given ``classes``) order; images directly in
    ``root`` with no class folders give targets -1. Defined behaviour for untidy trees:

    - hidden and system folders (``.*``, ``__MACOSX``, ...) are never classes nor scanned;
    - symbolic links are followed, but every real folder is read once, and a link into another
      class folder (or back into its own, a loop) is not followed, so no image is counted twice
      or under another class;
    - a class folder without images is left out, with a warning naming it;
    - images directly in ``root`` *and* class folders beside them is refused (which are the
      labels?), naming both counts.
    """
    root = Path(root)
    given = classes is not None
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_system(e.name))
    loose = _images_in(str(root))
    if classes is None:
        classes = found
        if classes and loose:
            raise ConfigurationError(
                f"{root} holds {len(loose)} images directly and {len(classes)} sub-folders ({', '.join(classes[:5])}"
                f"{', ...' if len(classes) > 5 else ''}): either every image goes in a class folder (labelled data) "
                "or none does (unlabelled data); move the loose images or the folders"
            )
    class_roots = {os.path.realpath(root / name) for name in classes}
    samples: list[tuple[str, int]] = []
    kept: list[str] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        target = index if given else len(kept)  # given classes keep their numbering
        start = os.path.realpath(root / name)
        visited = {start}
        files: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            allowed = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if _is_system(d) or real in visited or real in class_roots or any(real.startswith(c + os.sep) for c in class_roots - {start}):
                    continue
                visited.add(real)
                allowed.append(d)
            dirnames[:] = allowed
            files += [(os.path.join(dirpath, f), target) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if files:
            samples += files
            kept.append(name)
        else:
            empty.append(name)
    if empty and not given:
        warnings.warn(f"{root}: {len(empty)} class folder(s) without images left out: {', '.join(empty[:10])}")
    if not classes:
        samples = [(str(root / f), -1) for f in loose]
    return samples, list(classes) if given else kept


class ImageFiles(Dataset):
    """Image files with targets: ``dataset[i] = (PIL RGB image, target)``.

    Args:
        samples: ``[(path, target)]``.
        skip_corrupt: Replace an unreadable file by the next readable one and warn with a count,
            instead of raising :class:`CorruptImageError`.
    """

    def __init__(self, samples: list[tuple[str, int]], skip_corrupt: bool = False) -> None:
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                return load_rgb(path), target
            except CorruptImageError:
                if not self.skip_corrupt:
                    raise
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skip_corrupt=True: skipped unreadable image {path} ({len(self.skipped)} skipped so far in this process)")
        raise CorruptImageError("no readable image in the dataset")


def _require_folder(path: Path, argument: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{argument}={str(path)!r} does not exist or is not a directory; expected {FOLDER_LAYOUT}")


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)``: ``(train, held_out)`` with ``round(fraction * n)`` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(fraction * n)
    return sorted(order[k:]), sorted(order[:k])


class ImageFolderDataModule(SSLDataModule):
    """Any dataset in class-folder layout.

    ``train_dir/<class>/<image>`` (and ``val_dir`` likewise), or one folder split by a seeded
    ``val_fraction``; images directly in ``train_dir`` with no class folders are unlabelled
    (targets -1; no evaluation split then). Every image is read as RGB.

    Args:
        train_dir: Training images.
        val_dir: Evaluation images; ``None`` holds out ``val_fraction`` of ``train_dir``.
        val_fraction: Held-out fraction when ``val_dir`` is ``None`` (0 for none).
        seed: Seed of that split.
        skip_corrupt: Skip unreadable files with a warning instead of failing.
        **kwargs: :class:`SSLDataModule` arguments (image_size, batch_size, num_workers, ...).
    """

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.train_dir = Path(train_dir)
        self.val_dir = Path(val_dir) if val_dir is not None else None
        self.val_fraction = val_fraction
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.classes: list[str] = []

    def _scan(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]] | None]:
        _require_folder(self.train_dir, "train_dir")
        train, self.classes = scan_folder(self.train_dir)
        if not train:
            raise FileNotFoundError(f"train_dir={str(self.train_dir)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); expected {FOLDER_LAYOUT}")
        if self.val_dir is None:
            return train, None
        _require_folder(self.val_dir, "val_dir")
        val_classes = sorted(e.name for e in os.scandir(self.val_dir) if e.is_dir() and not _is_system(e.name))
        if val_classes and not self.classes:
            raise ConfigurationError(
                f"val_dir={str(self.val_dir)!r} has class folders but train_dir={str(self.train_dir)!r} has none: the "
                "evaluation needs labelled training images (kNN bank, linear probe); sort train_dir into the same "
                "class folders, or leave val_dir out"
            )
        unknown = sorted(set(val_classes) - set(self.classes))
        if unknown:
            raise ConfigurationError(
                f"val_dir={str(self.val_dir)!r} has {len(unknown)} class folder(s) that train_dir lacks "
                f"({', '.join(unknown[:5])}); the classes must match"
            )
        val, _ = scan_folder(self.val_dir, self.classes or None)
        if not val:
            raise FileNotFoundError(f"val_dir={str(self.val_dir)!r} holds no image files for the classes of train_dir; expected {FOLDER_LAYOUT}")
        return train, val

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders and build the pretraining, evaluation and bank sets."""
        if self.pretrain_set is not None:
            return
        train, val = self._scan()
        labelled = bool(self.classes)
        self.num_classes = len(self.classes) if labelled else 0
        if not labelled:
            rank_zero_warn(
                f"train_dir={str(self.train_dir)!r} has no class folders: its {len(train)} images are unlabelled, so "
                "nothing is evaluated (no validation loop; OnlineKNN and OnlineLinearProbe have no labels). Sort them "
                f"into class folders to evaluate while training ({FOLDER_LAYOUT})"
            )
        full = ImageFiles(train, self.skip_corrupt)
        if val is not None:
            self.pretrain_set = full
            self.eval_set = ImageFiles(val, self.skip_corrupt) if labelled else None
            self.bank_set = full if labelled else None
        elif self.val_fraction > 0 and labelled:
            keep, held = split_indices(len(full), self.val_fraction, self.seed)
            self.pretrain_set = Subset(full, keep)
            self.eval_set = Subset(full, held)
            self.bank_set = self.pretrain_set
        else:
            self.pretrain_set = full
            self.bank_set = full if labelled else None


def imagenet100_classes() -> list[str]:
    """The 100 ImageNet-1k class ids of ImageNet100 (the CMC list), shipped with the package."""
    text = resources.files("adios_pl.data").joinpath("imagenet100_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


class ImageNet100DataModule(SSLDataModule):
    """ImageNet100 (224 px) or ImageNet100-S (``image_size=96``) read in place from a full tree.

    ``data_dir`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the ILSVRC-2012
    validation images sorted into class folders); only the 100 classes of the CMC list are used,
    without copying files. A tree that holds just those 100 classes works too.

    Args:
        data_dir: Root of the ImageNet tree.
        image_size: 224 (ImageNet100) or 96 (ImageNet100-S).
        skip_corrupt: Skip unreadable files with a warning instead of failing.
        **kwargs: :class:`SSLDataModule` arguments.
    """

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, data_dir: str, image_size: int = 224, skip_corrupt: bool = False, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.data_dir = Path(data_dir)
        self.skip_corrupt = skip_corrupt
        self.classes = imagenet100_classes()

    def setup(self, stage: str | None = None) -> None:
        """Find the 100 classes in ``train/`` and ``val/`` and build the sets."""
        if self.pretrain_set is not None:
            return
        splits = {}
        for split in ("train", "val"):
            root = self.data_dir / split
            if not root.is_dir():
                raise FileNotFoundError(
                    f"data_dir={str(self.data_dir)!r} has no {split}/ folder; expected an ImageNet tree "
                    "data_dir/train/<wnid>/*.JPEG and data_dir/val/<wnid>/*.JPEG"
                )
            missing = [c for c in self.classes if not (root / c).is_dir()]
            if missing:
                flat = len(missing) == len(self.classes) and next(root.glob("*.JPEG"), None) is not None
                raise FileNotFoundError(
                    f"{len(missing)} of the 100 ImageNet100 classes are missing from {root} "
                    f"(first: {', '.join(missing[:5])}); the tree must hold these class folders"
                    + (f"; its images are not sorted into class folders (ILSVRC-2012's validation archive unpacks flat): "
                       f"sort them by the devkit's labels, or move {root} away and let torchvision.datasets.ImageNet"
                       "(data_dir, split='val') unpack ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz there sorted"
                       if flat else "")
                )
            splits[split], _ = scan_folder(root, self.classes)
        self.num_classes = len(self.classes)
        self.pretrain_set = ImageFiles(splits["train"], self.skip_corrupt)
        self.bank_set = self.pretrain_set
        self.eval_set = ImageFiles(splits["val"], self.skip_corrupt)
