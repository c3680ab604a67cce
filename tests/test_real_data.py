"""Real CIFAR-10 JPEGs (../shared/data/cifar10/train.tar.gz) through ImageFolderDataModule.

Slow (unpacks 50,000 files): run with ``pytest -m slow``. Skipped when the archive is absent.
"""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from adios_pl.data import ImageFolderDataModule

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.tar.gz"
pytestmark = [pytest.mark.slow, pytest.mark.real_data, pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} not present")]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    return root / "train"


def test_real_cifar10_layout_shapes_and_speed(cifar_dir: Path) -> None:
    dm = ImageFolderDataModule(str(cifar_dir), val_fraction=0.2, image_size=32, batch_size=128, num_workers=2, pin_memory=False, blur_prob=0.0)
    dm.setup("fit")
    assert dm.num_classes == 10 and len(dm.classes) == 10
    assert len(dm.pretrain_set) + len(dm.eval_set) == 50_000
    counts = torch.bincount(torch.tensor([t for _, t in dm.pretrain_set.dataset.samples]), minlength=10)
    assert (counts == 5000).all()
    loader = iter(dm.train_dataloader())
    (x1, x2), y = next(loader)
    assert x1.shape == (128, 3, 32, 32) and x1.dtype == torch.float32 and y.max() < 10
    assert -3.0 < float(x1.min()) < 0 < float(x1.max()) < 3.0
    start, images = time.perf_counter(), 0
    for _ in range(200):
        (x1, x2), y = next(loader)
        images += len(y)
    rate = images / (time.perf_counter() - start)
    print(f"\nreal CIFAR-10 two-view loader, 2 workers: {rate:.0f} images/s", file=sys.stderr)
    assert rate > 0
