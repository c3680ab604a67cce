"""Run ``adios-pl`` with the DataModules' data replaced by 16 random images (for the 2-process test).

The patch sits at module level, so the other ranks get it too: under ``ddp`` they run this file
again, under ``ddp_spawn`` they import it as their main module.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from adios_pl.cli import main
from adios_pl.data import CIFAR10DataModule, SSLDataModule
from adios_pl.data.torchvision_sets import _TorchvisionDataModule


class FakeImages(Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.images = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return Image.fromarray(self.images[i]), i % 10


def fake_setup(self: SSLDataModule, stage: str | None = None) -> None:
    self.pretrain_set = self.eval_set = self.bank_set = FakeImages(16, self.image_size)
    self.num_classes = 10


CIFAR10DataModule.setup = fake_setup  # type: ignore[method-assign]
_TorchvisionDataModule.prepare_data = lambda self: None  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
