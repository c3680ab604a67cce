"""Every public constructor and DataModule, fed wrong values: each raises a clear error that names
the argument. The case count is asserted and quoted in the README."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from PIL import Image

from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskQuality, MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.data import (
    CIFAR10DataModule,
    CorruptImageError,
    ImageFiles,
    ImageFolderDataModule,
    ImageNet100DataModule,
    ShapesDataModule,
    STL10DataModule,
)
from adios_pl.evaluation import linear_probe
from adios_pl.masks import MaskGenerator, RandomMasks
from adios_pl.objectives import BYOL, SimCLR, SimSiam
from adios_pl.optim import LARS, build_optimizer

from conftest import make_loader, quiet_trainer

TINY = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=16, mask_width=8, num_masks=2)


def module(**kw: Any) -> Callable[[], Any]:
    return lambda: ADIOSModule(**{**TINY, **kw})


def setup(dm: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: dm().setup("fit")


def corrupt_tree(tmp: Path) -> Path:
    (tmp / "a").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp / "a" / "ok.png")
    (tmp / "a" / "bad.png").write_bytes(b"not an image")
    return tmp


CASES: list[tuple[str, Callable[[Path], Callable[[], Any]], type, str]] = [
    # ADIOSModule
    ("num_masks negative", lambda t: module(num_masks=-2), ValueError, "num_masks"),
    ("num_masks one", lambda t: module(num_masks=1), ValueError, "num_masks=1"),
    ("num_masks float", lambda t: module(num_masks=2.0), ValueError, "num_masks"),
    ("num_masks string", lambda t: module(num_masks="4"), ValueError, "num_masks"),
    ("mask_mode unknown", lambda t: module(mask_mode="each"), ValueError, "mask_mode"),
    ("mask_type unknown", lambda t: module(mask_type="noise"), ValueError, "mask_type"),
    ("mask_norm unknown", lambda t: module(mask_norm="bn"), ValueError, "mask_norm"),
    ("mask_width not /8", lambda t: module(mask_width=12), ValueError, "mask_width"),
    ("mask_width zero", lambda t: module(mask_width=0), ValueError, "mask_width"),
    ("optimizer unknown", lambda t: module(optimizer="adam"), ValueError, "optimizer"),
    ("update unknown", lambda t: module(update="async"), ValueError, "update"),
    ("nonfinite unknown", lambda t: module(nonfinite="ignore"), ValueError, "nonfinite"),
    ("compile_encoder unknown mode", lambda t: module(compile_encoder="cudagraphs"), ValueError, "compile_encoder"),
    ("compile_mask_generator not a mode", lambda t: module(compile_mask_generator="fast"), ValueError, "compile_mask_generator"),
    ("compile_optimizers not a mode", lambda t: module(compile_optimizers="fused"), ValueError, "compile_optimizers"),
    ("compile_optimizers with AdamW", lambda t: module(compile_optimizers=True, optimizer="adamw"), ValueError, "compile_optimizers"),
    ("lr zero", lambda t: module(lr=0.0), ValueError, "lr"),
    ("mask_lr negative", lambda t: module(mask_lr=-1.0), ValueError, "mask_lr"),
    ("weight_decay negative", lambda t: module(weight_decay=-1e-4), ValueError, "weight_decay"),
    ("warmup_epochs negative", lambda t: module(warmup_epochs=-1), ValueError, "warmup_epochs"),
    ("sparsity_weight negative", lambda t: module(sparsity_weight=-0.1), ValueError, "sparsity_weight"),
    ("entropy_weight string", lambda t: module(entropy_weight="0.1"), ValueError, "entropy_weight"),
    ("image_size zero", lambda t: module(image_size=0), ValueError, "image_size"),
    ("image_size negative", lambda t: module(image_size=-32), ValueError, "image_size"),
    ("encoder unknown", lambda t: module(encoder="resnet19"), ValueError, "encoder"),
    ("encoder wrong type", lambda t: module(encoder=42), TypeError, "encoder"),
    ("encoder without num_features", lambda t: module(encoder=torch.nn.Flatten()), TypeError, "num_features"),
    ("timm encoder with its classifier", lambda t: module(encoder=timm.create_model("resnet10t", num_classes=7), encoder_kwargs={}),
     ValueError, r"returned \(2, 7\); for a timm model, create it with num_classes=0"),
    ("vit with odd size", lambda t: module(encoder="vit_tiny", encoder_kwargs={}, image_size=18), ValueError, "patch size"),
    ("objective wrong type", lambda t: module(objective="byol"), TypeError, "objective"),
    ("lr nan", lambda t: module(lr=float("nan")), ValueError, "lr must be a finite"),
    ("mask_lr inf", lambda t: module(mask_lr=float("inf")), ValueError, "mask_lr must be a finite"),
    ("warmup_epochs inf", lambda t: module(warmup_epochs=float("inf")), ValueError, "warmup_epochs"),
    ("sparsity_weight nan", lambda t: module(sparsity_weight=float("nan")), ValueError, "sparsity_weight"),
    ("min_lr_factor above one", lambda t: module(min_lr_factor=2.0), ValueError, "min_lr_factor"),
    ("mask_patch_size zero", lambda t: module(mask_type="random_patch", mask_patch_size=0), ValueError, "mask_patch_size"),
    ("schedule_interval unknown", lambda t: module(schedule_interval="batch"), ValueError, "schedule_interval"),
    ("warmup_start_lr negative", lambda t: module(warmup_start_lr=-0.1), ValueError, "warmup_start_lr"),
    ("SimSiam flags without both views", lambda t: (lambda: SimSiam(use_no_mask=True)), ValueError, "mask_both_views"),
    ("RandomMasks patch fractional", lambda t: (lambda: RandomMasks(2, 32, patch_size=1.5)), ValueError, "patch_size"),
    # objectives, masks, optimisers
    ("SimCLR temperature zero", lambda t: (lambda: SimCLR(temperature=0.0)), ValueError, "temperature"),
    ("BYOL tau order", lambda t: (lambda: BYOL(base_tau=1.0, final_tau=0.9)), ValueError, "base_tau"),
    ("MaskGenerator size too small", lambda t: (lambda: MaskGenerator(2, 2)), ValueError, "image_size"),
    ("RandomMasks kind", lambda t: (lambda: RandomMasks(2, 32, kind="stripes")), ValueError, "kind"),
    ("build_optimizer name", lambda t: (lambda: build_optimizer("rmsprop", [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.0)), ValueError, "optimizer"),
    ("LARS negative lr", lambda t: (lambda: LARS([torch.nn.Parameter(torch.zeros(1))], lr=-1.0)), ValueError, "lr"),
    # callbacks
    ("probe num_classes one", lambda t: (lambda: OnlineLinearProbe(num_classes=1)), ValueError, "num_classes"),
    ("probe num_classes string", lambda t: (lambda: OnlineLinearProbe(num_classes="10")), ValueError, "num_classes"),
    ("kNN k zero", lambda t: (lambda: OnlineKNN(k=0)), ValueError, "k must"),
    ("kNN k fractional", lambda t: (lambda: OnlineKNN(k=2.5)), ValueError, "k must"),
    ("kNN max_bank_size zero", lambda t: (lambda: OnlineKNN(max_bank_size=0)), ValueError, "max_bank_size"),
    ("kNN temperature nan", lambda t: (lambda: OnlineKNN(temperature=float("nan"))), ValueError, "temperature"),
    ("visualizer num_images zero", lambda t: (lambda: MaskVisualizer(num_images=0)), ValueError, "num_images"),
    ("kNN temperature zero", lambda t: (lambda: OnlineKNN(temperature=0.0)), ValueError, "temperature"),
    ("every_n_epochs zero", lambda t: (lambda: MaskQuality(every_n_epochs=0)), ValueError, "every_n_epochs"),
    ("visualizer every_n_epochs", lambda t: (lambda: MaskVisualizer(every_n_epochs=-1)), ValueError, "every_n_epochs"),
    # DataModules
    ("batch_size zero", lambda t: (lambda: ShapesDataModule(batch_size=0)), ValueError, "batch_size"),
    ("batch_size negative", lambda t: (lambda: ImageFolderDataModule(str(t), batch_size=-4)), ValueError, "batch_size"),
    ("num_workers negative", lambda t: (lambda: ShapesDataModule(num_workers=-1)), ValueError, "num_workers"),
    ("image_size too small", lambda t: (lambda: ShapesDataModule(image_size=4)), ValueError, "image_size"),
    ("min_scale zero", lambda t: (lambda: ShapesDataModule(min_scale=0.0)), ValueError, "min_scale"),
    ("std zero", lambda t: (lambda: ShapesDataModule(std=(0.2, 0.0, 0.2))), ValueError, "std"),
    ("mean of two channels", lambda t: (lambda: ShapesDataModule(mean=(0.5, 0.5))), ValueError, "3 each"),
    ("jitter_prob above one", lambda t: (lambda: ShapesDataModule(jitter_prob=1.5)), ValueError, "jitter_prob"),
    ("compile_augmentation not a mode", lambda t: (lambda: ShapesDataModule(augment_on="device", compile_augmentation="fast")),
        ValueError, "compile_augmentation"),
    ("compile_augmentation on the host", lambda t: (lambda: ShapesDataModule(compile_augmentation=True)), ValueError, 'augment_on="device"'),
    ("probe optimizer", lambda t: (lambda: linear_probe(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 2, optimizer="adam")), ValueError, "optimizer"),
    ("val_fraction one", lambda t: (lambda: ImageFolderDataModule(str(t), val_fraction=1.0)), ValueError, "val_fraction"),
    ("Shapes size zero", lambda t: setup(lambda: ShapesDataModule(train_size=0)), ValueError, "size"),
    ("STL10 split", lambda t: (lambda: STL10DataModule(pretrain_split="unlabeled")), ValueError, "pretrain_split"),
    ("folder missing", lambda t: setup(lambda: ImageFolderDataModule(str(t / "missing"))), FileNotFoundError, "train_dir"),
    ("folder empty", lambda t: setup(lambda: ImageFolderDataModule(str(t))), FileNotFoundError, "no image files"),
    ("val_dir missing", lambda t: setup(lambda: ImageFolderDataModule(str(corrupt_tree(t)), val_dir=str(t / "nope"))), FileNotFoundError, "val_dir"),
    ("corrupt file", lambda t: (lambda: ImageFiles([(str(corrupt_tree(t) / "a" / "bad.png"), 0)])[0]), CorruptImageError, "bad.png"),
    ("ImageNet100 missing", lambda t: setup(lambda: ImageNet100DataModule(str(t))), FileNotFoundError, "train/"),
    ("CIFAR missing", lambda t: setup(lambda: CIFAR10DataModule(data_dir=str(t / "none"))), FileNotFoundError, "download=True"),
    ("batch larger than data", lambda t: (lambda: ImageFolderDataModule(str(corrupt_tree(t)), val_fraction=0, batch_size=64).train_dataloader()),
        ValueError, "batch_size=64"),
]

# Batches fed to a built module: each a clear error, never a crash deep in the step.
BATCHES: list[tuple[str, Any, str]] = [
    ("not a pair", torch.randn(2, 3, 16, 16), "views, targets"),
    ("one view", ([torch.randn(2, 3, 16, 16)], torch.zeros(2, dtype=torch.long)), "two tensors"),
    ("views not grouped", (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)), "two tensors"),
    ("mismatched views", ((torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)), torch.zeros(2, dtype=torch.long)), "same shape"),
    ("wrong image size", ((torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)), torch.zeros(2, dtype=torch.long)), "image_size=16"),
    ("grayscale views", ((torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)), torch.zeros(2, dtype=torch.long)), r"\(B, 3"),
    ("targets wrong length", ((torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)), torch.zeros(3, dtype=torch.long)), "targets"),
]


@pytest.mark.parametrize(("name", "make", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_argument(tmp_path: Path, name: str, make: Callable[[Path], Callable[[], Any]], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make(tmp_path)()


@pytest.mark.parametrize(("name", "batch", "match"), BATCHES, ids=[b[0] for b in BATCHES])
def test_bad_batch(name: str, batch: Any, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        ADIOSModule(**TINY)._unpack(batch)


def test_simclr_with_one_image_per_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 images"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(ADIOSModule(**TINY), make_loader(n=4, batch_size=1, size=16))


def test_readme_counts_the_cases() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"feeds (\d+) wrong values", readme)
    assert quoted is not None and int(quoted.group(1)) == len(CASES) + len(BATCHES) + 1
