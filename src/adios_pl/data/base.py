"""The shared DataModule logic: loaders, the validation pair, checks."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adios_pl.errors import ConfigurationError
from adios_pl.data.transforms import TwoViews, eval_transform, pretrain_transform


class Transformed(Dataset):
    """``base[i] = (image, target, *extra)`` -> ``(transform(image), target, *extra)``.

    With ``keep_extra=False`` the extras (e.g. a segmentation) are dropped.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], keep_extra: bool = True) -> None:
        self.base = base
        self.transform = transform
        self.keep_extra = keep_extra

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        image, target, *extra = self.base[index]
        if not self.keep_extra:
            return self.transform(image), target
        return (self.transform(image), target, *extra)


class SSLDataModule(pl.LightningDataModule):
    """Base of every DataModule here.

    Subclasses set, in :meth:`setup`, ``pretrain_set`` (images for self-supervised training,
    targets -1 where unlabelled), ``eval_set`` (the labelled evaluation split) and ``bank_set``
    (labelled training images), all returning ``(image, target, ...)`` before transforms, plus
    ``num_classes``.

    Batches:
        - ``train_dataloader()``: ``((view_1, view_2), targets)`` under the two-view pretraining
          transform, shuffled, ``drop_last=True``.
        - ``val_dataloader()``: two loaders under the evaluation transform, in this order:
          index 0 the evaluation split, index 1 the labelled training images (the kNN memory
          bank). Batches are ``(images, targets)`` (Shapes adds the segmentation).

    Args:
        image_size: Side of the square views.
        batch_size: Per device.
        num_workers: Loader worker processes per device.
        pin_memory: Pin host memory; ``None`` (default) pins only when the trainer runs on a GPU.
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
        mean: Normalisation mean (dataset default when ``None``).
        std: Normalisation std (dataset default when ``None``).
        min_scale: Smallest RandomResizedCrop area fraction.
        brightness: Colour-jitter strength.
        contrast: Colour-jitter strength.
        saturation: Colour-jitter strength.
        hue: Colour-jitter strength.
        blur_prob: Probability of Gaussian blur (0 for 32-px data, as in solo-learn's CIFAR runs).
        jitter_prob: Probability of colour jitter.
        grayscale_prob: Probability of grayscale.
        solarization_prob: Probability of solarisation.
        flip_prob: Probability of a horizontal flip.
    """

    default_mean: Sequence[float] = (0.5, 0.5, 0.5)
    default_std: Sequence[float] = (0.25, 0.25, 0.25)
    default_blur_prob: float = 0.5

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 256,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_scale: float = 0.08,
        brightness: float = 0.8,
        contrast: float = 0.8,
        saturation: float = 0.8,
        hue: float = 0.2,
        blur_prob: float | None = None,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        solarization_prob: float = 0.0,
        flip_prob: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value, low in (("image_size", image_size, 8), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        probs = dict(jitter_prob=jitter_prob, grayscale_prob=grayscale_prob, solarization_prob=solarization_prob, flip_prob=flip_prob)
        for name, prob in probs.items():
            if not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {prob!r}")
        self.probabilities = probs
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.mean = tuple(mean) if mean is not None else tuple(self.default_mean)
        self.std = tuple(std) if std is not None else tuple(self.default_std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel (3 each), got mean={self.mean!r}, std={self.std!r}")
        if not all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in self.std):
            raise ValueError(f"std must be 3 finite numbers > 0, got {self.std!r}")
        self.jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.min_scale = min_scale
        self.blur_prob = self.default_blur_prob if blur_prob is None else blur_prob
        self.num_classes: int | None = None
        self.pretrain_set: Dataset | None = None
        self.eval_set: Dataset | None = None
        self.bank_set: Dataset | None = None

    # transforms ------------------------------------------------------------------------
    def train_transform(self) -> Callable[[Any], tuple[Tensor, Tensor]]:
        """The two-view pretraining transform."""
        return TwoViews(pretrain_transform(
            self.image_size, self.mean, self.std, min_scale=self.min_scale, blur_prob=self.blur_prob,
            **self.jitter, **self.probabilities,
        ))

    def val_transform(self) -> Callable[[Any], Tensor]:
        """The deterministic evaluation transform."""
        return eval_transform(self.image_size, self.mean, self.std)

    # loaders ---------------------------------------------------------------------------
    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        trainer = getattr(self, "trainer", None)
        accelerator = type(getattr(trainer, "accelerator", None)).__name__
        return accelerator == "CUDAAccelerator"

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self._pin(),
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled two-view batches ``((view_1, view_2), targets)``, last partial batch dropped."""
        if self.pretrain_set is None:
            self.setup("fit")
        assert self.pretrain_set is not None
        n = len(self.pretrain_set)  # type: ignore[arg-type]
        world = self.trainer.world_size if self.trainer is not None else 1
        if n // world < self.batch_size:
            raise ConfigurationError(
                f"batch_size={self.batch_size} is larger than the {n // world} training images per device "
                f"({n} images, {world} device(s)); with drop_last=True no step would run. Lower batch_size."
            )
        return self._loader(Transformed(self.pretrain_set, self.train_transform(), keep_extra=False), shuffle=True, drop_last=True)

    def predict_dataloader(self) -> list[DataLoader]:
        """The loaders of :meth:`val_dataloader`: features of both splits (``adios-pl predict``)."""
        return self.val_dataloader()

    def val_dataloader(self) -> list[DataLoader]:
        """``[evaluation split, labelled training images (kNN bank)]`` under the evaluation transform."""
        if self.eval_set is None:
            self.setup("fit")
        loaders = []
        for dataset in (self.eval_set, self.bank_set):
            if dataset is not None:
                loaders.append(self._loader(Transformed(dataset, self.val_transform()), shuffle=False, drop_last=False))
        return loaders
