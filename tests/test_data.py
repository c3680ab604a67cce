"""DataModules on tiny fake data in the real on-disk layouts, and the Shapes generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from adios_pl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CorruptImageError,
    ImageFolderDataModule,
    ImageNet100DataModule,
    ShapesDataModule,
    ShapesDataset,
    STL10DataModule,
    imagenet100_classes,
    load_rgb,
)
from adios_pl.data.shapes import RandomColourShuffle
from adios_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, pretrain_transform

LOADER = dict(batch_size=4, num_workers=0, pin_memory=False)


def _write(path: Path, mode: str = "RGB", size: int = 40, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(path)
        return
    channels = {"RGB": 3, "RGBA": 4, "L": 1}.get(mode, 3)
    array = rng.integers(0, 255, (size, size, channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(array, mode="RGB" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
    image.save(path, format=fmt)


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for c in ("cat", "dog", "eel"):
        for i in range(6):
            _write(root / c / f"{i}.jpg")
    _write(root / "cat" / "gray.png", "L")
    _write(root / "dog" / "alpha.png", "RGBA")
    _write(root / "dog" / "palette.png", "P")
    _write(root / "eel" / "deep.png", "I;16")
    return root


def test_image_folder_split_shapes_and_ranges(folder_tree: Path) -> None:
    dm = ImageFolderDataModule(str(folder_tree), val_fraction=0.25, image_size=32, **LOADER)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    assert len(dm.pretrain_set) + len(dm.eval_set) == 22 and len(dm.eval_set) == round(0.25 * 22)
    (x1, x2), y = next(iter(dm.train_dataloader()))
    assert x1.shape == x2.shape == (4, 3, 32, 32) and x1.dtype == torch.float32 and y.dtype == torch.long
    assert not torch.equal(x1, x2)
    val, bank = dm.val_dataloader()
    x, y = next(iter(val))
    assert x.shape == (4, 3, 32, 32) and -3 < float(x.min()) and float(x.max()) < 3
    assert sum(len(b[1]) for b in bank) == len(dm.pretrain_set)


def test_train_and_val_dirs_and_unlabelled(tmp_path: Path, folder_tree: Path) -> None:
    dm = ImageFolderDataModule(str(folder_tree), val_dir=str(folder_tree), image_size=32, **LOADER)
    dm.setup("fit")
    assert len(dm.eval_set) == len(dm.pretrain_set) == 22
    flat = tmp_path / "flat"
    for i in range(5):
        _write(flat / f"{i}.png")
    dm = ImageFolderDataModule(str(flat), image_size=32, **LOADER)
    with pytest.warns(UserWarning, match=r"no class folders: its 5 images are unlabelled, so nothing is evaluated"):
        dm.setup("fit")
    assert dm.num_classes == 0 and dm.eval_set is None and dm.val_dataloader() == []
    assert next(iter(dm.train_dataloader()))[1].tolist() == [-1] * 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_odd_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    _write(tmp_path / "x.png", mode)
    image = load_rgb(str(tmp_path / "x.png"))
    assert image.mode == "RGB"
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert np.asarray(image).mean() < 200


def test_corrupt_file_named_or_skipped(folder_tree: Path) -> None:
    bad = folder_tree / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    dm = ImageFolderDataModule(str(folder_tree), val_fraction=0, image_size=32, **LOADER)
    dm.setup("fit")
    index = [p for p, _ in dm.pretrain_set.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        dm.pretrain_set[index]
    dm = ImageFolderDataModule(str(folder_tree), val_fraction=0, image_size=32, skip_corrupt=True, **LOADER)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="1 skipped"):
        image, _ = dm.pretrain_set[index]
    assert image.mode == "RGB"


def test_missing_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist.*class folders"):
        ImageFolderDataModule(str(tmp_path / "does-not-exist")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")


def test_batch_larger_than_dataset(folder_tree: Path) -> None:
    dm = ImageFolderDataModule(str(folder_tree), image_size=32, batch_size=64, num_workers=0)
    with pytest.raises(ValueError, match="batch_size=64 is larger"):
        dm.train_dataloader()


def test_imagenet100_selects_the_list(tmp_path: Path) -> None:
    classes = imagenet100_classes()
    assert len(classes) == 100 and len(set(classes)) == 100
    for split in ("train", "val"):
        for c in classes + ["n99999999", "n88888888"]:  # two extra classes that must be ignored
            _write(tmp_path / split / c / "a.JPEG", size=8)
    dm = ImageNet100DataModule(str(tmp_path), image_size=96, **LOADER)
    dm.setup("fit")
    assert dm.num_classes == 100 and len(dm.pretrain_set) == 100 and len(dm.eval_set) == 100
    assert dm.std == IMAGENET_STD
    (x1, _), _ = next(iter(dm.train_dataloader()))
    assert x1.shape == (4, 3, 96, 96)
    assert ImageNet100DataModule(str(tmp_path)).image_size == 224


def test_imagenet100_missing_classes(tmp_path: Path) -> None:
    classes = imagenet100_classes()
    for split in ("train", "val"):
        for c in classes[3:]:
            _write(tmp_path / split / c / "a.JPEG", size=8)
    with pytest.raises(FileNotFoundError, match=f"3 of the 100.*{classes[0]}.*class folders$"):
        ImageNet100DataModule(str(tmp_path)).setup("fit")


def test_imagenet100_unsorted_validation_images_say_how_to_sort_them(tmp_path: Path) -> None:
    for c in imagenet100_classes():
        _write(tmp_path / "train" / c / "a.JPEG", size=8)
    _write(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", size=8)  # the archive unpacks flat
    with pytest.raises(FileNotFoundError, match=r"100 of the 100 .* are missing from .*val.*not sorted into class folders.*split='val'"):
        ImageNet100DataModule(str(tmp_path)).setup("fit")


class FakeTorchvision:
    """Stands in for a torchvision dataset class; records how it was called."""

    calls: list[dict[str, Any]] = []

    def __init__(self, root: str, download: bool = False, train: bool = True, split: str | None = None, n: int = 12) -> None:
        FakeTorchvision.calls.append(dict(root=root, download=download, train=train, split=split))
        if not Path(root).exists():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.classes = [str(i) for i in range(10)]
        size = 96 if split is not None else 32
        self.data = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        self.targets = [-1] * n if split == "unlabeled" else [i % 10 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.targets[i]


@pytest.mark.parametrize(("cls", "name"), [(CIFAR10DataModule, "CIFAR10"), (CIFAR100DataModule, "CIFAR100")])
def test_cifar_modules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cls: type, name: str) -> None:
    monkeypatch.setattr(torchvision.datasets, name, FakeTorchvision)
    dm = cls(data_dir=str(tmp_path), **LOADER)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.blur_prob == 0.0
    (x1, x2), y = next(iter(dm.train_dataloader()))
    assert x1.shape == (4, 3, 32, 32)
    assert [c["train"] for c in FakeTorchvision.calls[-2:]] == [True, False]
    with pytest.raises(FileNotFoundError, match="download=True"):
        cls(data_dir=str(tmp_path / "nowhere")).setup("fit")


def test_stl10_pretrains_on_train_and_unlabeled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torchvision.datasets, "STL10", FakeTorchvision)
    dm = STL10DataModule(data_dir=str(tmp_path), **LOADER)
    dm.setup("fit")
    assert len(dm.pretrain_set) == 24 and len(dm.bank_set) == 12 and dm.image_size == 96
    targets = [dm.pretrain_set[i][1] for i in range(24)]
    assert targets.count(-1) == 12
    only = STL10DataModule(data_dir=str(tmp_path), pretrain_split="train", **LOADER)
    only.setup("fit")
    assert len(only.pretrain_set) == 12
    with pytest.raises(ValueError, match="pretrain_split"):
        STL10DataModule(pretrain_split="test")


def test_stl10_evaluation_images_are_resized_whole_not_cropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The reference resizes STL10's evaluation images to 96 x 96: at 96 px already they come out
    as they went in, only normalised (a centre crop of a 110-px resize would cut the border)."""
    monkeypatch.setattr(torchvision.datasets, "STL10", FakeTorchvision)
    dm = STL10DataModule(data_dir=str(tmp_path), **LOADER)
    dm.setup("fit")
    image, _ = dm.eval_set[0]  # type: ignore[index]
    expected = TF.normalize(TF.to_dtype(TF.to_image(image), torch.float32, scale=True), list(dm.mean), list(dm.std))
    torch.testing.assert_close(dm.val_transform()(image), expected, atol=1e-6, rtol=0)


def test_each_torchvision_datamodule_normalises_with_its_own_datasets_statistics() -> None:
    """The per-channel mean and std of each dataset's training images, as commonly published."""
    published = {
        CIFAR10DataModule: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        CIFAR100DataModule: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        STL10DataModule: ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    }
    for cls, (mean, std) in published.items():
        dm = cls()
        assert (dm.mean, dm.std) == (mean, std), cls.__name__


def test_batch_size_is_checked_against_each_devices_share_of_the_images() -> None:
    """24 images on 2 devices are 12 per device: a batch of 16 would never fill (drop_last), a
    batch of 12 does."""
    from adios_pl.errors import ConfigurationError

    def on_two_devices(batch_size: int) -> ShapesDataModule:
        dm = ShapesDataModule(train_size=24, val_size=8, batch_size=batch_size, num_workers=0, pin_memory=False)
        dm.trainer = type("T", (), {"world_size": 2})()  # type: ignore[assignment]
        return dm

    with pytest.raises(ConfigurationError, match="12 training images per device"):
        on_two_devices(16).train_dataloader()
    assert len(on_two_devices(12).train_dataloader()) == 2  # one process's loader sees all 24 here


def test_shapes_deterministic_and_consistent() -> None:
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    for i in range(50):
        image, label, seg = a[i]
        image2, label2, seg2 = b[i]
        assert torch.equal(image, image2) and label == label2 and torch.equal(seg, seg2)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and seg.shape == (32, 32)
        ids = seg.unique().tolist()
        assert set(ids) <= set(range(4)) and seg.max() >= 1
        assert (seg == seg.max()).sum() > 20, "the main object is drawn last and stays visible"
        for obj in ids[1:]:  # each object's pixels share one colour (plus slight noise)
            pixels = image.permute(1, 2, 0)[seg == obj].float()
            assert len(pixels) < 10 or pixels.std(dim=0).max() < 12, (i, obj)
    assert not torch.equal(ShapesDataset(5, seed=4)[0][0], a[0][0])


def test_shapes_labels_balanced() -> None:
    counts = np.bincount(ShapesDataset(2000).labels(), minlength=4)
    assert (np.abs(counts / 2000 - 0.25) < 0.04).all(), counts


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_colour_shuffle_applies_with_probability_p(p: float) -> None:
    """An applied shuffle moves every image (random gains); over 2000 draws the share it moved is
    p, within 4 standard deviations."""
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    shuffle = RandomColourShuffle(p=p)
    torch.manual_seed(0)
    moved = sum(not torch.equal(shuffle(image), image) for _ in range(2000)) / 2000
    assert abs(moved - p) <= 4 * (p * (1 - p) / 2000) ** 0.5, moved


def test_shapes_datamodule_batches() -> None:
    dm = ShapesDataModule(train_size=32, val_size=16, batch_size=8, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 4
    (x1, x2), y = next(iter(dm.train_dataloader()))
    assert x1.shape == (8, 3, 32, 32) and y.max() < 4
    val, bank = dm.val_dataloader()
    x, y, seg = next(iter(val))
    assert x.shape == (8, 3, 32, 32) and seg.shape == (8, 32, 32)
    raw = ShapesDataset(16, seed=1)[0]
    assert torch.equal(seg[0], raw[2]) and y[0] == raw[1]
    assert abs(float(torch.cat([b[0] for b in bank]).mean())) < 0.3


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_training_loader_drops_the_partial_last_batch(augment_on: str) -> None:
    """20 images in batches of 8: two batches of 8. The 4 left over would make a batch of another
    size: a recompile under torch.compile, and a noisier batch-norm and contrastive step."""
    dm = ShapesDataModule(train_size=20, val_size=8, batch_size=8, num_workers=0, pin_memory=False, augment_on=augment_on)
    dm.setup("fit")
    assert [len(targets) for *_, targets in dm.train_dataloader()] == [8, 8]


def test_pretraining_crop_is_the_published_bicubic_random_resized_crop() -> None:
    """ADIOS.md, "Data": RandomResizedCrop with scale (min_scale, 1) and bicubic interpolation."""
    steps = pretrain_transform(96, IMAGENET_MEAN, IMAGENET_STD, min_scale=0.2).transforms  # type: ignore[attr-defined]
    crop = next(step for step in steps if isinstance(step, T.RandomResizedCrop))
    assert crop.size == (96, 96) and crop.scale == (0.2, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC


@pytest.mark.parametrize("size", [64, 96])
def test_evaluation_images_are_centre_cropped_from_96_px(size: int) -> None:
    """Images of 96 px and more: the short side resized to size / 0.875, then the centre crop;
    smaller ones: resized to size x size. Written out with torchvision's functional ops."""
    image = torch.randint(0, 256, (3, 70, 140), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if size >= 96:
        geometry = TF.center_crop(TF.resize(image, [round(size / 0.875)], InterpolationMode.BICUBIC, antialias=True), [size, size])
    else:
        geometry = TF.resize(image, [size, size], InterpolationMode.BICUBIC, antialias=True)
    expected = TF.normalize(TF.to_dtype(geometry, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert torch.equal(eval_transform(size, IMAGENET_MEAN, IMAGENET_STD)(image), expected)
