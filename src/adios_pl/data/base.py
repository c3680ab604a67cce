"""The shared DataModule logic: loaders, the validation pair, checks."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adios_pl.backend import pl
from adios_pl.checks import check_compile_setting
from adios_pl.data.device_augment import DeviceAugmentation
from adios_pl.data.resumable import EpochSampler, ResumableLoader, SeededDataset, batch_seed, lightning_seed
from adios_pl.data.transforms import TwoViews, eval_transform, pretrain_transform, uint8_transform
from adios_pl.errors import ConfigurationError

#: Largest decoded training set (bytes, per process) that ``cache_images=None`` keeps in memory.
AUTO_CACHE_BYTES = 4 * 2**30


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


class CachedImages(Dataset):
    """Decoded images held in memory: ``(images[i], targets[i])``, uint8 ``(3, S, S)`` each."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    @classmethod
    def decode(cls, dataset: Dataset, size: int, num_workers: int = 0) -> "CachedImages":
        """Decode every ``(uint8 image, target)`` of ``dataset`` once, with ``num_workers`` processes."""
        n = len(dataset)  # type: ignore[arg-type]
        images = torch.empty(n, 3, size, size, dtype=torch.uint8)
        targets = torch.empty(n, dtype=torch.long)
        loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, shuffle=False)
        start = 0
        for batch_images, batch_targets in loader:
            images[start:start + len(batch_images)] = batch_images
            targets[start:start + len(batch_images)] = batch_targets
            start += len(batch_images)
        return cls(images, targets)


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
        augment_on: ``"host"`` (default): the loader workers augment each image (torchvision
            v2) and ship float views. ``"device"``: the loader ships uint8 images of
            ``stored_size`` and the two-view augmentation runs batched on the training device
            (:class:`~adios_pl.data.device_augment.DeviceAugmentation`, in
            ``on_after_batch_transfer``), so a GPU is not held back by the CPU. Training batches
            are ``((view_1, view_2), targets)`` either way; evaluation loaders are unchanged.
            Subclass pipelines that override :meth:`train_transform` (Shapes' colour shuffle)
            are replaced by the standard one on the device. Each batch's random draws come from
            (seed, rank, epoch, batch), so a resumed run makes the views a straight run would.
        cache_images: With ``augment_on="device"``: decode the training images once into memory
            (uint8). ``None`` (default) caches when they take at most 4 GiB per process (CIFAR,
            STL10, Shapes, ImageNet100-S at 96 px); otherwise workers decode every epoch.
        stored_size: With ``augment_on="device"``: side of the stored images (short side resized,
            centre-cropped); ``None`` means ``image_size``. Crops of larger stored images keep
            more detail, at the cost of memory.
        compile_augmentation: With ``augment_on="device"``: ``True`` or a ``torch.compile`` mode
            compiles the augmentation's image operations (its random draws stay eager, so the
            draws are those of the eager augmentation): a few fused kernels instead of a few
            hundred launches per batch, or one CUDA-graph replay in ``"reduce-overhead"`` mode.
            Compilation takes a minute or so at the first batch. ``False`` (default): eager.
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
        augment_on: Literal["host", "device"] = "host",
        cache_images: bool | None = None,
        stored_size: int | None = None,
        compile_augmentation: bool | str = False,
    ) -> None:
        super().__init__()
        if augment_on not in ("host", "device"):
            raise ValueError(f'augment_on must be "host" or "device", got {augment_on!r}')
        check_compile_setting("compile_augmentation", compile_augmentation)
        if compile_augmentation and augment_on != "device":
            raise ValueError(
                f'compile_augmentation={compile_augmentation!r} compiles the augmentation on the device; '
                'it needs augment_on="device" (the loader workers augment with torchvision otherwise)'
            )
        self.compile_augmentation = compile_augmentation
        if stored_size is not None and (not isinstance(stored_size, int) or isinstance(stored_size, bool) or stored_size < 8):
            raise ValueError(f"stored_size must be None or an integer >= 8, got {stored_size!r}")
        if cache_images is not None and not isinstance(cache_images, bool):
            raise ValueError(f"cache_images must be True, False or None, got {cache_images!r}")
        self.augment_on = augment_on
        self.cache_images = cache_images
        self.stored_size = stored_size
        self._device_augmentation: DeviceAugmentation | None = None
        self._augmentation_seed: tuple[int, int] = (0, 0)  # (run seed, rank), set with the augmentation
        self._cached: CachedImages | None = None
        self._train_loader: ResumableLoader | None = None
        self._train_loader_state: dict[str, int] | None = None
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
        return TwoViews(pretrain_transform(self.image_size, self.mean, self.std, **self._augmentation_settings()))

    def _augmentation_settings(self) -> dict[str, Any]:
        """The pretraining augmentation's strengths and probabilities, shared by both pipelines."""
        return dict(min_scale=self.min_scale, blur_prob=self.blur_prob, **self.jitter, **self.probabilities)

    def device_augmentation(self) -> DeviceAugmentation:
        """The two-view pretraining augmentation as a batched module (``augment_on="device"``)."""
        return DeviceAugmentation(self.image_size, self.mean, self.std, compile_augmentation=self.compile_augmentation,
                                  **self._augmentation_settings())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch for the loader's resume state; with ``augment_on="device"``,
        turn it from uint8 images into two views."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return batch
        if self._train_loader is not None:
            self._train_loader.count_batch()
        if self.augment_on != "device":
            return batch
        images, targets = batch
        if self._device_augmentation is None:
            augmentation = self.device_augmentation()
            # Its own generator on the device, seeded differently on each rank: with the device's
            # default generator every rank (seeded alike) would draw the same crops for its batch.
            self._augmentation_seed = (torch.initial_seed(), int(getattr(trainer, "global_rank", 0)))
            augmentation.generator = torch.Generator(device=images.device)
            augmentation.generator.manual_seed(batch_seed(*self._augmentation_seed))
            self._device_augmentation = augmentation
        loader, generator = self._train_loader, self._device_augmentation.generator
        if loader is not None and loader.batch_size and generator is not None:
            # Each batch's draws from (run seed, rank, epoch, batch): a resumed run, mid-epoch
            # too, makes the views a straight run would have made (a host-side reseed, no sync).
            index = loader.images_done // loader.batch_size - 1
            generator.manual_seed(batch_seed(*self._augmentation_seed, loader.sampler.epoch, index))
        return self._device_augmentation(images), targets

    def _stored_pretrain_set(self) -> Dataset:
        """Training images as uint8 ``(3, S, S)`` tensors, decoded once into memory when they fit."""
        assert self.pretrain_set is not None
        size = self.stored_size or self.image_size
        decoded = Transformed(self.pretrain_set, uint8_transform(size), keep_extra=False)
        n = len(self.pretrain_set)  # type: ignore[arg-type]
        cache = n * 3 * size * size <= AUTO_CACHE_BYTES if self.cache_images is None else self.cache_images
        if not cache:
            return decoded
        if self._cached is None or len(self._cached) != n:
            self._cached = CachedImages.decode(decoded, size, self.num_workers)
        return self._cached

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

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """An evaluation loader: every image once, in the split's order."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self._pin(),
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled two-view batches ``((view_1, view_2), targets)``, last partial batch dropped.

        With ``augment_on="device"`` the loader yields ``(uint8 images, targets)`` and the views
        are made on the device (:meth:`on_after_batch_transfer`). The order of an epoch is drawn
        from the seed of ``seed_everything`` and the epoch, each process taking its share as
        Lightning's ``DistributedSampler`` would, and a checkpoint taken part-way through an
        epoch resumes with the batches that had not been trained on
        (:class:`~adios_pl.data.resumable.ResumableLoader`). On the host each image's augmentation
        draws from a seed of (seed, epoch, its place in the order)
        (:class:`~adios_pl.data.resumable.SeededDataset`), so the resumed batches' views are the
        ones a straight run makes, whatever ``num_workers``. The loader shards itself, so
        ``Trainer(use_distributed_sampler=False)`` does not give every process all the images.
        """
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
        dataset: Dataset
        if self.augment_on == "device":
            dataset = self._stored_pretrain_set()
        else:  # each image's draws seeded from (seed, epoch, position): a resume makes the same views
            dataset = SeededDataset(Transformed(self.pretrain_set, self.train_transform(), keep_extra=False))
        shares = getattr(self.trainer, "distributed_sampler_kwargs", None) or {}
        sampler = EpochSampler(dataset, num_replicas=int(shares.get("num_replicas", 1)), rank=int(shares.get("rank", 0)),
                               seed=lightning_seed(), with_seeds=self.augment_on != "device")
        self._train_loader = ResumableLoader(dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers,
                                             pin_memory=self._pin(), persistent_workers=self.persistent_workers)
        limit = getattr(self.trainer, "limit_train_batches", None)
        if isinstance(limit, int):  # Lightning's rule: a number of batches, or a fraction of them
            self._train_loader.batches_per_epoch = limit
        elif isinstance(limit, float) and limit < 1.0:
            self._train_loader.batches_per_epoch = int(len(self._train_loader) * limit)
        if self._train_loader_state is not None:  # once: a later fit() starts where it is told
            self._train_loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the epoch (Lightning saves it in checkpoints), so that resuming
        continues with the images that had not been trained on."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader where the checkpoint's was, now or when it is made.

        The DataModule carries the loader's state as well as the loader itself: Lightning restores
        a loader's state only when it makes the loader after restoring the loops, and a module
        that reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (as
        ``ADIOSModule`` does) makes it before.
        """
        self._train_loader_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._train_loader_state is not None:  # already made
            self._train_loader.load_state_dict(self._train_loader_state)

    def teardown(self, stage: str) -> None:
        """Forget a checkpoint's loader state that no loader took: a strategy that restores after
        ``configure_optimizers`` (``restore_checkpoint_after_setup``) hands it to a loader already
        made, and a later ``fit`` with this DataModule must not resume from it again."""
        if stage == "fit":
            self._train_loader_state = None

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
                loaders.append(self._eval_loader(Transformed(dataset, self.val_transform())))
        return loaders
