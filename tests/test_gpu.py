"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adios_pl import ADIOSModule
from adios_pl.objectives import BYOL, SimCLR
from conftest import make_loader, quiet_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(**kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(encoder="resnet18", objective=SimCLR(), num_masks=4, image_size=96, mask_width=16, warmup_epochs=0, lr=0.05, mask_lr=0.05)
    args.update(kw)
    return ADIOSModule(**args)


def _updates(model: ADIOSModule, steps: int = 2, **trainer: Any) -> dict[str, torch.Tensor]:
    before = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    quiet_trainer(accelerator="gpu", max_steps=steps, **trainer).fit(model, make_loader(n=32 * steps, batch_size=32, size=model.image_size))
    after = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    return {p: torch.cat([(after[k] - before[k]).flatten() for k in before if k.startswith(p + ".")]) for p in ("encoder", "mask_generator")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_mixed_precision_steps_match_fp32(precision: str, objective: str) -> None:
    make = (lambda: SimCLR()) if objective == "simclr" else (lambda: BYOL())
    fp32 = _updates(_model(objective=make()), precision="32-true")
    mixed = _updates(_model(objective=make()), precision=precision)
    assert _rel(mixed["encoder"], fp32["encoder"]) < 0.15
    cosine = torch.nn.functional.cosine_similarity(mixed["mask_generator"], fp32["mask_generator"], dim=0)
    assert cosine > 0.5, float(cosine)


def test_channels_last_and_compile_match_eager() -> None:
    # The mask generator's gradient at initialisation is tiny and noise-like, so other kernels
    # (channels-last, compiled) move it far more than the encoder's: compare its direction.
    eager = _updates(_model(), precision="32-true")
    fast = _updates(_model(channels_last=True, compile_encoder=True), precision="32-true")
    assert _rel(fast["encoder"], eager["encoder"]) < 0.05, _rel(fast["encoder"], eager["encoder"])
    cosine = torch.nn.functional.cosine_similarity(fast["mask_generator"], eager["mask_generator"], dim=0)
    assert cosine > 0.5, float(cosine)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sync_batchnorm_ddp_runs(tmp_path: Any) -> None:
    model = _model(objective=BYOL())
    trainer = quiet_trainer(accelerator="gpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, max_steps=2)
    trainer.fit(model, make_loader(n=128, batch_size=32, size=96))
    assert trainer.global_step == 2


def test_offline_evaluation_on_the_gpu_matches_the_cpu() -> None:
    from adios_pl.evaluation import knn_accuracy, linear_probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=generator) * 2
    y = torch.randint(0, 5, (600,), generator=generator)
    x = centres[y] + torch.randn(600, 32, generator=generator)
    split = (x[:500], y[:500], x[500:], y[500:])
    on_gpu = tuple(t.cuda() for t in split)
    assert abs(linear_probe(*on_gpu, 5, epochs=10) - linear_probe(*split, 5, epochs=10)) <= 0.01
    assert knn_accuracy(*on_gpu, 5, k=20) == knn_accuracy(*split, 5, k=20)
