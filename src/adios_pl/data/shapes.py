"""Shapes: procedurally generated scenes with object masks, for CPU-sized end-to-end runs.

Each scene shows one to three objects of the *same* shape -- the label (circle, square,
triangle, cross) -- in random colours, sizes and positions (one large, the others smaller and
sometimes overlapping), on a background of a random colour with pixel-noise texture. Colour,
size, position and background carry no label; shape does, and it is also what tells scenes
apart once crops and colour jitter have removed colour and position, so self-supervised
training learns it. (A first design with smoothly textured backgrounds and distractors of other
shapes let SimCLR tell scenes apart by background and colour alone: its kNN accuracy on the
shape barely moved in CPU minutes.) Every sample also has a per-pixel segmentation
(0 = background, 1..K = objects in drawing order, the largest last) for measuring how well masks
find objects.

Scenes are generated on the fly from ``(seed, index)``: no files, identical in every worker.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from adios_pl.data.base import SSLDataModule
from adios_pl.data.transforms import TwoViews

SHAPES = ("circle", "square", "triangle", "cross")
#: Per-channel mean and std of the generated images, measured on 20,000 scenes at 32 px.
SHAPES_MEAN = (0.4990, 0.4988, 0.4973)
SHAPES_STD = (0.2404, 0.2408, 0.2401)


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    if kind == "triangle":  # pointing up, base at cy + r/2
        return (dy <= 0.5 * r) & (np.abs(dx) <= (dy + r) * 0.6667)
    if kind == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {kind!r}; accepted: {SHAPES}")


def render_scene(seed: int, index: int, image_size: int = 32, max_distractors: int = 2) -> tuple[np.ndarray, int, np.ndarray]:
    """One scene: ``(image uint8 (S, S, 3), label, segmentation int64 (S, S))``."""
    rng = np.random.default_rng([seed, index])
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5

    # Background: a random colour with pixel-noise texture.
    base = rng.uniform(0.15, 0.85, size=3)
    image = base[None, None, :] + rng.normal(0, 0.08, size=(s, s, 3))
    segmentation = np.zeros((s, s), np.int64)

    def colour() -> np.ndarray:
        c = rng.uniform(0, 1, size=3)
        while np.abs(c - base).max() < 0.35:  # keep objects visible against the background
            c = rng.uniform(0, 1, size=3)
        return c

    num_distractors = int(rng.integers(0, max_distractors + 1))
    label = int(rng.integers(len(SHAPES)))
    objects = [(SHAPES[label], rng.uniform(0.10, 0.17) * s) for _ in range(num_distractors)]
    objects.append((SHAPES[label], rng.uniform(0.24, 0.34) * s))
    for object_id, (kind, r) in enumerate(objects, start=1):
        margin = 0.6 * r
        cy, cx = rng.uniform(margin, s - margin, size=2)
        inside = _shape_mask(kind, yy, xx, cy, cx, r)
        image[inside] = colour() + rng.normal(0, 0.02, size=(int(inside.sum()), 3))
        segmentation[inside] = object_id
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label, segmentation


class ShapesDataset(Dataset):
    """``dataset[i] = (image uint8 (3, S, S), label, segmentation (S, S))``, deterministic per seed.

    Args:
        size: Number of scenes.
        image_size: Side S.
        seed: Scenes of different seeds are independent.
        max_distractors: Up to this many smaller objects (of the same shape) under the main one.
    """

    def __init__(self, size: int, image_size: int = 32, seed: int = 0, max_distractors: int = 2) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.max_distractors = max_distractors

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        image, label, segmentation = render_scene(self.seed, index, self.image_size, self.max_distractors)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), label, torch.from_numpy(segmentation)

    def labels(self) -> list[int]:
        """All labels (renders every scene)."""
        return [render_scene(self.seed, i, self.image_size, self.max_distractors)[1] for i in range(self.size)]


class RandomColourShuffle:
    """Cheap strong colour augmentation for float images in [0, 1]: with probability ``p``,
    permute the RGB channels, scale each channel by a gain in ``[1 - brightness, 1 + brightness]``
    and stretch the contrast around the mean by a factor in ``[1 - contrast, 1 + contrast]``."""

    def __init__(self, p: float = 0.8, brightness: float = 0.8, contrast: float = 0.8) -> None:
        self.p, self.brightness, self.contrast = p, brightness, contrast

    def __call__(self, image: Tensor) -> Tensor:
        """Augment one ``(3, H, W)`` image."""
        if float(torch.rand(())) >= self.p:
            return image
        image = image[torch.randperm(3)]
        gains = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.brightness
        image = image * gains
        mean = image.mean()
        contrast = 1 + (float(torch.rand(())) * 2 - 1) * self.contrast
        return ((image - mean) * contrast + mean).clamp(0, 1)

    def __repr__(self) -> str:
        return f"RandomColourShuffle(p={self.p}, brightness={self.brightness}, contrast={self.contrast})"


class ShapesDataModule(SSLDataModule):
    """The built-in default data: :class:`ShapesDataset` scenes, no download.

    Pretraining uses ``train_size`` scenes; evaluation uses ``val_size`` others (a different
    seed). Validation batches are ``(images, labels, segmentations)``: the segmentation feeds
    the mask-quality metric. Augmentation: crops of at least ``min_scale`` of the image, flips,
    a cheap strong colour augmentation (:class:`RandomColourShuffle`; colour carries no label
    here) and grayscale, no blur.

    Args:
        train_size: Scenes for pretraining (and the kNN bank).
        val_size: Scenes for evaluation.
        seed: Seed of the training scenes (evaluation uses ``seed + 1``).
        max_distractors: Smaller objects per scene, 0 to this.
        **kwargs: :class:`~adios_pl.data.base.SSLDataModule` arguments (image_size, batch_size, ...).
    """

    default_mean = SHAPES_MEAN
    default_std = SHAPES_STD
    default_blur_prob = 0.0

    def __init__(
        self,
        train_size: int = 8192,
        val_size: int = 1024,
        seed: int = 0,
        max_distractors: int = 2,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 2,
        min_scale: float = 0.35,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, min_scale=min_scale, **kwargs)
        self.train_size = train_size
        self.val_size = val_size
        self.seed = seed
        self.max_distractors = max_distractors
        self.num_classes = len(SHAPES)

    def setup(self, stage: str | None = None) -> None:
        """Create the (lazy) scene datasets."""
        if self.pretrain_set is not None:
            return
        self.pretrain_set = ShapesDataset(self.train_size, self.image_size, self.seed, self.max_distractors)
        self.bank_set = self.pretrain_set
        self.eval_set = ShapesDataset(self.val_size, self.image_size, self.seed + 1, self.max_distractors)

    def train_transform(self) -> Callable[[Any], tuple[Tensor, Tensor]]:
        """Two views: crop, flip, colour shuffle, grayscale, normalisation (on uint8 tensors).

        The colour augmentation is :class:`RandomColourShuffle` rather than ``ColorJitter``:
        as strong for this data (colour carries no label) and 20x cheaper, so two loader
        workers keep up with CPU training on 2 cores (ColorJitter's hue shift alone took
        about 0.4 ms a view and made the loader the bottleneck). Of the jitter strengths it uses
        ``brightness`` and ``contrast``; ``saturation`` and ``hue`` have no effect here (the
        channel shuffle replaces them).
        """
        view = T.Compose([
            T.RandomResizedCrop(self.image_size, scale=(self.min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            RandomColourShuffle(p=0.8, brightness=self.jitter["brightness"], contrast=self.jitter["contrast"]),
            T.RandomGrayscale(p=0.2),
            T.Normalize(self.mean, self.std),
        ])
        return TwoViews(view)

    def val_transform(self) -> Callable[[Any], Tensor]:
        """Normalisation only, so the segmentation stays aligned with the image."""
        return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])
