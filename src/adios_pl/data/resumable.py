"""A training loader that a checkpoint taken part-way through an epoch resumes exactly.

Lightning resumes an ordinary shuffled loader mid-epoch by iterating it afresh and running only
the epoch's remaining number of batches, so the images of the batches already trained on come
again and as many others never come. Here the order of an epoch is a pure function of
``(seed, epoch)``, each process takes its share as torch's ``DistributedSampler`` does (so under
DDP the order is the one Lightning would have chosen), and the loader's ``state_dict`` says how
many images of the epoch were trained on; the resumed epoch starts after them. The DataModule
counts the batches and carries the state in checkpoints (``SSLDataModule.state_dict``).

The random draws of host augmentation resume too: with ``with_seeds=True`` the sampler hands each
item a key ``(seed, epoch, position in the epoch's order)`` and :class:`SeededDataset` seeds the
generators from it before fetching the item, so an image's views depend on neither the loader
worker that made them, nor the number of workers, nor where the run was resumed.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from adios_pl.backend import rank_zero_warn


def batch_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of ``keys`` (numpy's ``SeedSequence``),
    e.g. ``(run seed, rank, epoch, batch)``: draws seeded from it replay exactly on resume."""
    low, high = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint32)
    return (int(high) << 32 | int(low)) % 2**63


def lightning_seed() -> int:
    """The seed ``seed_everything`` set (``PL_GLOBAL_SEED``), 0 when none: what Lightning gives
    the ``DistributedSampler`` it puts into training loaders under DDP."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochSampler(DistributedSampler):
    """This process's share of a random order drawn from ``(seed, epoch)``, from index ``start``.

    A ``DistributedSampler`` (shuffled, padded to a multiple of ``num_replicas``), so Lightning
    keeps it under DDP and sets its epoch. ``resume_at(epoch, start)`` makes the iterations of
    that epoch skip their first ``start`` indices; other epochs are whole. With ``with_seeds``
    it yields ``(index, (seed, epoch, position))`` for a :class:`SeededDataset`, where
    ``position`` is the item's place in the epoch's order over all processes (unique, also for
    the images that padding repeats).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 with_seeds: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.with_seeds = with_seeds
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Start the iterations of ``epoch`` at index ``start`` of this process's share."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._resume = (epoch, start)

    @property
    def start(self) -> int:
        """Where the current epoch's iteration starts (0 unless it is the resumed epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self) -> Iterator[Any]:
        start = self.start
        indices = list(super().__iter__())[start:]
        if not self.with_seeds:
            return iter(indices)
        # DistributedSampler's share of the order is every num_replicas-th item from the rank's.
        positions = range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas)
        return ((index, (self.seed, self.epoch, position)) for index, position in zip(indices, positions))


class SeededDataset(Dataset):
    """``dataset[index]`` fetched with torch's (CPU), Python's and numpy's global generators
    seeded from ``key``: ``SeededDataset(dataset)[(index, key)]``, the items of an
    ``EpochSampler(with_seeds=True)``.

    So the random draws of a transform inside ``dataset`` (torchvision's draw from torch's
    generator; others from Python's or numpy's) are a pure function of the key. In a loader
    worker the generators are seeded and left so (they serve only the dataset); in the main
    process (``num_workers=0``) they are put back after each batch (``__getitems__``, which the
    loader calls with a batch's keys), and training's own draws do not depend on the loading.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, tuple[int, ...]]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, tuple[int, ...]]]) -> list[Any]:
        """The items of ``items``, each drawn from its own key's seed."""
        in_worker = get_worker_info() is not None  # a worker's generators serve only the dataset
        with contextlib.nullcontext() if in_worker else _generators_kept():
            return [self._fetch(index, batch_seed(*key)) for index, key in items]

    def _fetch(self, index: int, seed: int) -> Any:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """Torch's (CPU), Python's and numpy's global generators are as they were after the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose ``state_dict`` says where training is.

    ``images_done`` counts the images of the current epoch that training has taken on this
    process. The DataModule calls :meth:`count_batch` for each training batch it hands over
    (``on_after_batch_transfer``), so batches the loader has prefetched and training has not
    seen do not count. Batches are whole (``drop_last=True``).
    """

    sampler: EpochSampler

    def __init__(self, dataset: Dataset, sampler: EpochSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self.images_done = 0
        #: Batches an epoch trains on when the Trainer stops it early (``limit_train_batches``);
        #: ``None``: all of them.
        self.batches_per_epoch: int | None = None

    def __iter__(self) -> Any:
        self.images_done = self.sampler.start
        return super().__iter__()

    def count_batch(self) -> None:
        """Training has taken one more batch of this loader."""
        self.images_done += int(self.batch_size or 0)

    def state_dict(self) -> dict[str, int]:
        """The epoch, the images of it that training has taken on this process, the images the
        epoch has on this process, and the number of processes (saved in checkpoints)."""
        batches = len(self) if self.batches_per_epoch is None else min(len(self), self.batches_per_epoch)
        epoch_images = batches * int(self.batch_size or 0)
        return {"epoch": int(self.sampler.epoch), "images_done": self.images_done, "epoch_images": epoch_images,
                "num_replicas": int(self.sampler.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Set the sampler to the epoch that resumes, after the images it had taken (a changed
        batch size is fine). With another number of processes the shares differ: a part-way
        epoch starts afresh."""
        epoch, done = int(state["epoch"]), int(state["images_done"])
        if done >= int(state["epoch_images"]):  # written at the epoch's end: the next one is whole
            epoch, done = epoch + 1, 0
        # Lightning sets the resumed epoch only after it has made the epoch's iterator, and loader
        # workers draw the order when the iterator is made: the sampler must know it already.
        self.sampler.set_epoch(epoch)
        if state.get("num_replicas") != self.sampler.num_replicas:
            if done:
                rank_zero_warn(
                    f"the checkpoint was written part-way through an epoch by {state.get('num_replicas')} training "
                    f"processes and this run has {self.sampler.num_replicas}: the epoch starts afresh, so some of "
                    "its images come twice"
                )
            return
        self.sampler.resume_at(epoch, done)
