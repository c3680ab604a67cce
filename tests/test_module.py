"""ADIOSModule: construction errors, batch counting, schedules, outputs, logging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from adios_pl import ADIOSModule
from adios_pl.objectives import BYOL, SimCLR, momentum_tau
from adios_pl.optim import warmup_cosine

from conftest import make_loader, quiet_trainer

TINY: dict[str, Any] = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=16, mask_width=8, num_masks=3)


def tiny(**kw: Any) -> ADIOSModule:
    args = dict(TINY)
    args.update(kw)
    return ADIOSModule(**args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_masks=-1), ValueError, "num_masks"),
        (dict(num_masks=1), ValueError, "num_masks=1"),
        (dict(num_masks=2.5), ValueError, "num_masks"),
        (dict(mask_mode="some"), ValueError, "mask_mode"),
        (dict(encoder="resnet7"), ValueError, "resnet18"),
        (dict(optimizer="adam"), ValueError, "optimizer.*sgd"),
        (dict(mask_norm="bn"), ValueError, "mask_norm"),
        (dict(image_size=4), ValueError, "image_size"),
        (dict(lr=0), ValueError, "lr"),
        (dict(sparsity_weight=-1), ValueError, "sparsity_weight"),
        (dict(objective="simclr"), TypeError, "objective"),
        (dict(encoder=3), TypeError, "encoder"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tiny(**kwargs)


class NoFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class WrongFeatures(nn.Module):
    num_features = 7

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(dim=(2, 3)))


def test_custom_encoder_checks() -> None:
    with pytest.raises(TypeError, match="num_features"):
        tiny(encoder=NoFeatures())
    with pytest.raises(ValueError, match="num_features=7"):
        tiny(encoder=WrongFeatures())
    with pytest.raises(ValueError, match="patch size"):
        tiny(encoder="vit_tiny", image_size=30, encoder_kwargs={})


def test_heads_exist_after_construction() -> None:
    model = tiny(objective=BYOL(proj_hidden_dim=16, proj_output_dim=8, pred_hidden_dim=16))
    assert isinstance(model.objective.projector, nn.Module) and isinstance(model.objective.predictor, nn.Module)
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
    masks = model.mask_generator(torch.randn(2, 3, 16, 16))
    assert masks.shape == (2, 3, 16, 16)
    assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, model.encoder.num_features)


@pytest.mark.parametrize(
    "batch",
    [
        [torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)],
        ((torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)),),
        ((torch.randn(2, 3, 16, 16), torch.randn(2, 3, 12, 12)), torch.zeros(2, dtype=torch.long)),
        ((torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)), torch.zeros(2, dtype=torch.long)),
    ],
)
def test_bad_batches_are_clear_errors(batch: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="views|batch|shape"):
        tiny()._unpack(batch)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row.update(global_step=trainer.global_step, outputs=outputs, tau=getattr(module.objective, "tau", None))
        self.rows.append(row)


def test_global_step_lr_and_tau_count_batches() -> None:
    rec = Recorder()
    model = tiny(objective=BYOL(proj_hidden_dim=16, proj_output_dim=8, pred_hidden_dim=16), lr=0.4, mask_lr=0.2, warmup_epochs=1)
    trainer = quiet_trainer(max_steps=6, callbacks=[rec])
    trainer.fit(model, make_loader(n=24, batch_size=8, size=16))  # 3 batches an epoch, 2 epochs
    assert trainer.global_step == 6 and len(rec.rows) == 6 and trainer.current_epoch == 2
    assert model.total_steps == 6
    for k, row in enumerate(rec.rows):
        assert row["global_step"] == k + 1
        assert row["train/lr"] == pytest.approx(0.4 * warmup_cosine(k, 3, 6))
        assert row["train/mask_lr"] == pytest.approx(0.2 * warmup_cosine(k, 3, 6))
        assert row["tau"] == pytest.approx(momentum_tau(k, 6, 0.99, 1.0))


def test_training_step_returns_clean_features_and_logs() -> None:
    rec = Recorder()
    quiet_trainer(max_steps=1, callbacks=[rec]).fit(tiny(), make_loader(n=8, size=16))
    out = rec.rows[0]["outputs"]
    assert out["features"].shape == (8, 64) and not out["features"].requires_grad
    assert out["targets"].shape == (8,)
    for key in ["encoder_loss", "mask_loss", "sparsity_penalty", "mask_area_mean", "mask_area_min", "mask_area_max", "lr", "mask_lr"]:
        assert f"train/{key}" in rec.rows[0], key
    assert rec.rows[0]["train/mask_area_mean"] == pytest.approx(1 / 3, abs=1e-5)


def test_adios_s_handles_a_smaller_last_batch() -> None:
    rec = Recorder()
    quiet_trainer(max_epochs=1, callbacks=[rec]).fit(tiny(mask_mode="one"), make_loader(n=11, batch_size=4, size=16))
    assert len(rec.rows) == 3 and rec.rows[-1]["outputs"]["features"].shape[0] == 3


def test_baseline_has_no_mask_generator_and_one_optimizer() -> None:
    model = tiny(num_masks=0)
    assert model.mask_generator is None
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, make_loader(n=16, size=16))
    assert len(trainer.optimizers) == 1 and trainer.global_step == 2


def test_non_finite_loss_stops_with_a_named_error() -> None:
    model = tiny()
    with torch.no_grad():
        model.objective.projector.layers[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at batch 0.*train/encoder_loss=nan"):
        quiet_trainer(max_steps=1).fit(model, make_loader(n=8, size=16))


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
@pytest.mark.parametrize("norm", ["gn", "in", "none"])
def test_optimizers_and_norms_train(optimizer: str, norm: str) -> None:
    model = tiny(optimizer=optimizer, mask_norm=norm)
    before = {name: [p.detach().clone() for p in part.parameters()] for name, part in (("encoder", model.encoder), ("masks", model.mask_generator))}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, make_loader(n=16, size=16))
    assert [type(o).__name__ for o in trainer.optimizers] == [{"sgd": "SGD", "lars": "LARS", "adamw": "AdamW"}[optimizer]] * 2
    norm_layers = {"gn": torch.nn.GroupNorm, "in": torch.nn.InstanceNorm2d}
    if norm in norm_layers:
        assert any(isinstance(m, norm_layers[norm]) for m in model.mask_generator.modules())
    else:
        assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.InstanceNorm2d)) for m in model.mask_generator.modules())
    for name, part in (("encoder", model.encoder), ("masks", model.mask_generator)):
        after = list(part.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(before[name], after)), f"{optimizer}: the {name} player did not move"


@pytest.mark.parametrize(("encoder", "size", "features"), [("resnet18", 32, 512), ("vit_tiny", 32, 192), ("resnet18", 96, 512), ("resnet50", 64, 2048)])
def test_real_backbones_shapes(encoder: str, size: int, features: int) -> None:
    model = ADIOSModule(encoder=encoder, image_size=size, num_masks=2, mask_width=8, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16))
    assert model.encoder.num_features == features
    assert model.embed(torch.randn(2, 3, size, size)).shape == (2, features)


@pytest.mark.parametrize("encoder", ["resnet18", "vit_tiny"])
def test_real_backbones_train_a_step(encoder: str) -> None:
    model = ADIOSModule(encoder=encoder, image_size=32, num_masks=2, mask_width=8, warmup_epochs=0, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16))
    before = [p.detach().clone() for p in model.encoder.parameters()]
    quiet_trainer(max_steps=1).fit(model, make_loader(n=4, batch_size=4, size=32))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters()))


@pytest.mark.parametrize(("size", "small"), [(32, True), (64, True), (96, False)])
def test_the_cifar_stem_and_the_vit_patch_4_up_to_64_px(size: int, small: bool) -> None:
    """The documented boundary: images of 64 px or less get the ResNet's 3x3 stride-1 stem
    without max-pool and ViT patches of 4; larger ones torchvision's stem and patches of 16."""
    from adios_pl.encoders import create_encoder

    resnet, vit = create_encoder("resnet18", image_size=size), create_encoder("vit_tiny", image_size=size)
    assert resnet.conv1.kernel_size == ((3, 3) if small else (7, 7)) and isinstance(resnet.maxpool, nn.Identity) is small
    assert vit.patch_embed.proj.kernel_size == ((4, 4) if small else (16, 16))


def test_lightly_dataset_batches_train_and_evaluate(tmp_path: Path) -> None:
    """A folder read by lightly's ``LightlyDataset`` with its ``SimCLRTransform`` trains as it is, and
    validates with the callbacks: its batches carry the file names after the targets, which are
    not a segmentation."""
    from lightly.data import LightlyDataset
    from lightly.transforms import SimCLRTransform
    from torchvision.transforms import v2 as T

    from adios_pl.callbacks import MaskQuality, MaskVisualizer, OnlineKNN, OnlineLinearProbe

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    dataset = LightlyDataset(str(tmp_path), transform=SimCLRTransform(input_size=16, gaussian_blur=0.0))
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    views, targets, names = next(iter(loader))
    assert len(views) == 2 and views[0].shape == (4, 3, 16, 16) and list(names) == ["a/0.png", "a/1.png", "a/2.png", "a/3.png"]
    evaluation = LightlyDataset(str(tmp_path), transform=T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Resize(16)]))
    val = [DataLoader(evaluation, batch_size=4), DataLoader(evaluation, batch_size=4)]
    rec = Recorder()
    callbacks = [rec, OnlineKNN(k=3), OnlineLinearProbe(num_classes=2), MaskQuality(), MaskVisualizer(num_images=2, out_dir=str(tmp_path / "masks"))]
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)
    with pytest.warns(UserWarning, match="carry no segmentation"):
        trainer.fit(tiny(), loader, val)
    assert len(rec.rows) == 2 and rec.rows[1]["outputs"]["targets"].tolist() == [1, 1, 1, 1]
    assert {"val/knn_top1", "val/linear_top1"} <= set(trainer.callback_metrics) and not any(key.startswith("val/mask_") for key in trainer.callback_metrics)
    assert len(list((tmp_path / "masks").glob("*.png"))) == 1
