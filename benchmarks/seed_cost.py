"""What seeding the augmentation's draws costs, next to the augmentation itself.

A resumed run makes the views a straight run would have made because the draws are seeded:
with ``augment_on="host"`` each image seeds torch's, Python's and numpy's global generators from
(seed, epoch, position) before it is augmented (``SeededDataset``), and with ``augment_on="device"`` each batch
reseeds the augmentation's generator from (seed, rank, epoch, batch). This times, per image or
per batch:

- the host seed per image of a batch, in a loader worker (timed inside a worker, where the
  generators are seeded and left so) and in the main process (``num_workers=0``, where they
  are also put back, once a batch);
- the device reseed (a CUDA generator when there is one, else a CPU one);
- for scale, an image's two views at 32 px under the CIFAR pretraining transform.

    python benchmarks/seed_cost.py [--repeats 20000] [--batch 256]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from adios_pl.data.resumable import SeededDataset, batch_seed
from adios_pl.data.transforms import CIFAR10_MEAN, CIFAR10_STD, TwoViews, pretrain_transform


class Nothing(Dataset):
    """Items that cost nothing to fetch, so that only the seeding is timed."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return index


def per_call_us(call: Callable[[int], Any], repeats: int) -> float:
    """Microseconds per ``call(i)``, the best of three passes of ``repeats`` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(repeats):
            call(i)
        best = min(best, time.perf_counter() - start)
    return best / repeats * 1e6


def host_seed_us(repeats: int, batch: int) -> float:
    """Microseconds per image of fetching batches of ``batch`` keys from a ``SeededDataset``
    whose own fetch costs nothing, as the loader does (``__getitems__``)."""
    seeded = SeededDataset(Nothing())
    return per_call_us(lambda i: seeded.__getitems__([(0, (5, 1, i * batch + j)) for j in range(batch)]),
                       max(repeats // batch, 10)) / batch


class InWorker(Dataset):
    """One item: the host seed's cost per image, timed inside the loader worker that fetches it."""

    def __init__(self, repeats: int, batch: int) -> None:
        self.repeats, self.batch = repeats, batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> float:
        return host_seed_us(self.repeats, self.batch)


def main() -> None:
    """Time the seeds and the augmentation and print microseconds per image or batch."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20000, help="images or batches per timed pass (best of 3 passes)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch of host seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)

    worker = next(iter(DataLoader(InWorker(args.repeats, args.batch), batch_size=None, num_workers=1)))
    main_process = host_seed_us(args.repeats, args.batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device)
    reseed = per_call_us(lambda i: generator.manual_seed(batch_seed(5, 0, 1, i)), args.repeats)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    views = TwoViews(pretrain_transform(32, CIFAR10_MEAN, CIFAR10_STD, blur_prob=0.0))
    augment = per_call_us(lambda i: views(image), max(args.repeats // 20, 50))

    print(f"torch {torch.__version__}, one thread, best of 3 passes")
    rows = [(f"host seed per image (batch {args.batch}), in a worker", worker),
            (f"host seed per image (batch {args.batch}), num_workers=0", main_process),
            (f"device reseed per batch ({device} generator)", reseed),
            ("two views of a 32 px image (CIFAR transform)", augment)]
    for name, us in rows:
        print(f"{name:<46} {us:8.1f} us")


if __name__ == "__main__":
    main()
