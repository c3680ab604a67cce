"""ADIOSModule's step equals a plain re-implementation of the reference step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

import adios_pl.module as module_lib
from adios_pl import ADIOSModule
from adios_pl.objectives import BYOL, SimCLR, SimSiam
from adios_pl.optim import warmup_cosine
from conftest import make_loader, quiet_trainer
from adios_pl.reference import reference_step

NUM_BATCHES = 2


def _objective(name: str) -> Any:
    if name == "simclr":
        return SimCLR(temperature=0.5, proj_hidden_dim=64, proj_output_dim=32)
    if name == "byol":
        return BYOL(proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=64, base_tau=0.9)
    return SimSiam(proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=16)


def _flat(module: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run_both(objective: str, mode: str, dtype: torch.dtype, num_masks: int = 3) -> dict[str, tuple[Tensor, Tensor]]:
    """Train NUM_BATCHES batches with ADIOSModule and with the reference; return the updates."""
    torch.manual_seed(0)
    model = ADIOSModule(
        encoder="small_cnn", encoder_kwargs={"width": 8}, objective=_objective(objective), num_masks=num_masks,
        mask_mode=mode, sparsity_weight=0.7, entropy_weight=0.3, image_size=16, mask_width=8,
        lr=0.05, mask_lr=0.02, weight_decay=1e-4, warmup_epochs=0,
    ).to(dtype)
    ref = copy.deepcopy(model)
    before = {"encoder": _flat(model.encoder), "heads": _flat(model.objective), "mask": _flat(model.mask_generator) if num_masks else None}

    drawn: list[Tensor] = []
    original = module_lib.sample_slots

    def recording(*args: Any, **kw: Any) -> Tensor:
        slots = original(*args, **kw)
        drawn.append(slots.clone())
        return slots

    loader = make_loader(n=8 * NUM_BATCHES, batch_size=8, size=16, dtype=dtype)
    precision = "64-true" if dtype == torch.float64 else "32-true"
    module_lib.sample_slots = recording
    try:
        quiet_trainer(max_epochs=1, precision=precision).fit(model, loader)
    finally:
        module_lib.sample_slots = original

    hp = model.hparams
    enc_params = list(ref.encoder.parameters()) + list(ref.objective.trainable_parameters())
    enc_opt = torch.optim.SGD(enc_params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
    mask_opt = torch.optim.SGD(ref.mask_generator.parameters(), lr=hp.mask_lr, momentum=0.9, weight_decay=hp.weight_decay) if num_masks else None
    for step, ((x1, x2), _) in enumerate(loader):
        factor = warmup_cosine(step, 0, NUM_BATCHES)
        for opt, lr in ((enc_opt, hp.lr), (mask_opt, hp.mask_lr)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * factor
        reference_step(
            ref.encoder, ref.objective, ref.mask_generator, x1, x2, enc_opt, mask_opt, num_masks,
            hp.sparsity_weight, hp.entropy_weight, step, NUM_BATCHES, slots=drawn[step] if mode == "one" else None,
        )
    out = {
        "encoder": (_flat(model.encoder) - before["encoder"], _flat(ref.encoder) - before["encoder"]),
        "heads": (_flat(model.objective) - before["heads"], _flat(ref.objective) - before["heads"]),
    }
    if num_masks:
        out["mask"] = (_flat(model.mask_generator) - before["mask"], _flat(ref.mask_generator) - before["mask"])
    return out


@pytest.mark.parametrize("objective", ["simclr", "byol", "simsiam"])
def test_step_equals_reference_float64(objective: str) -> None:
    for part, (fast, slow) in _run_both(objective, "all", torch.float64).items():
        assert slow.norm() > 0, f"{part} did not move"
        assert _rel(fast, slow) < 1e-10, f"{objective}: {part} update differs by {_rel(fast, slow):.2e}"


@pytest.mark.parametrize("objective", ["simclr", "byol", "simsiam"])
def test_step_equals_reference_float32(objective: str) -> None:
    for part, (fast, slow) in _run_both(objective, "all", torch.float32).items():
        assert _rel(fast, slow) < 1e-4, f"{objective}: {part} update differs by {_rel(fast, slow):.2e}"


@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_adios_s_equals_reference(objective: str) -> None:
    for part, (fast, slow) in _run_both(objective, "one", torch.float64).items():
        assert slow.norm() > 0, f"{part} did not move"
        assert _rel(fast, slow) < 1e-10, f"{objective} ADIOS-s: {part} update differs by {_rel(fast, slow):.2e}"


def test_baseline_without_masks_equals_reference() -> None:
    for part, (fast, slow) in _run_both("simclr", "all", torch.float64, num_masks=0).items():
        assert _rel(fast, slow) < 1e-10, f"num_masks=0: {part} update differs by {_rel(fast, slow):.2e}"


class _Snapshots(pl.Callback):
    """Parameters just before each optimiser step and at the end of the batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Tensor, Tensor, bool]] = []

    def _take(self, module: ADIOSModule, tag: str) -> None:
        enc = torch.cat([_flat(module.encoder), _flat(module.objective)])
        encoder_has_grads = any(p.grad is not None for p in module.encoder.parameters())
        self.seen.append((tag, enc, _flat(module.mask_generator), encoder_has_grads))

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: ADIOSModule, optimizer: Any) -> None:
        self._take(module, "encoder" if optimizer is trainer.optimizers[0] else "mask")

    def on_train_batch_end(self, trainer: pl.Trainer, module: ADIOSModule, *args: Any) -> None:
        self._take(module, "end")


def test_each_step_updates_only_its_player() -> None:
    model = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, objective=_objective("byol"), num_masks=3,
                        image_size=16, mask_width=8, warmup_epochs=0, lr=0.1, mask_lr=0.1)
    snaps = _Snapshots()
    quiet_trainer(max_steps=1, callbacks=[snaps]).fit(model, make_loader(n=8, size=16))
    (t0, enc0, mask0, _), (t1, enc1, mask1, grads_in_mask_step), (t2, enc2, mask2, _) = snaps.seen
    assert (t0, t1, t2) == ("encoder", "mask", "end")
    assert torch.equal(mask0, mask1), "the encoder step changed the mask generator"
    assert not torch.equal(enc0, enc1), "the encoder step did not change the encoder"
    assert torch.equal(enc1, enc2), "the mask step changed the encoder or heads"
    assert not torch.equal(mask1, mask2), "the mask step did not change the mask generator"
    assert not grads_in_mask_step, "the mask step computed gradients for the frozen encoder"
