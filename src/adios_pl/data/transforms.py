"""Augmentations: the two-view pretraining pipeline of ADIOS/SimCLR and the evaluation transform.

Built on ``torchvision.transforms.v2``, which takes PIL images and uint8 tensors alike.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)  # the reference's 0.228 is a typo
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)


def pretrain_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float = 0.08,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.5,
    flip_prob: float = 0.5,
    solarization_prob: float = 0.0,
) -> Callable[[Any], Tensor]:
    """One view of the published pretraining augmentation (ADIOS.md, "Data").

    RandomResizedCrop (bicubic, scale ``(min_scale, 1)``), colour jitter with probability
    ``jitter_prob``, grayscale, Gaussian blur (sigma in [0.1, 2], kernel about a tenth of the
    image), solarisation (threshold half the range), horizontal flip, then normalisation -- the
    reference's order. Returns a float tensor ``(3, S, S)``.
    """
    steps: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if jitter_prob > 0:
        steps.append(T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob))
    if grayscale_prob > 0:
        steps.append(T.RandomGrayscale(p=grayscale_prob))
    if blur_prob > 0:
        kernel = max(3, (image_size // 10) | 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
    if solarization_prob > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarization_prob))
    if flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(p=flip_prob))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop: bool | None = None) -> Callable[[Any], Tensor]:
    """Deterministic evaluation transform.

    With ``crop`` (default for images of 96 px and more): resize the short side to
    ``image_size / 0.875`` and centre-crop, as usual on ImageNet; otherwise resize to
    ``image_size``.
    """
    crop = image_size >= 96 if crop is None else crop
    geometry: list[Any]
    if crop:
        geometry = [T.Resize(round(image_size / 0.875), interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(image_size)]
    else:
        geometry = [T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    return T.Compose([T.ToImage(), *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def uint8_transform(size: int) -> Callable[[Any], Tensor]:
    """Decode to a uint8 tensor ``(3, size, size)``: short side resized to ``size``, centre crop
    (the stored images of ``augment_on="device"``; a no-op on images of that size already)."""
    return T.Compose([
        T.ToImage(), T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
        T.ToDtype(torch.uint8, scale=True), T.ToPureTensor(),
    ])


class TwoViews:
    """Apply one random ``transform`` twice: ``image -> (view_1, view_2)``."""

    def __init__(self, transform: Callable[[Any], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[Tensor, Tensor]:
        """Two independent draws of the augmentation."""
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"
