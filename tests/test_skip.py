"""nonfinite="skip": a dropped batch leaves every piece of state as it was and still counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineLinearProbe
from adios_pl.objectives import BYOL

from conftest import TwoViewTensors, quiet_trainer


def _model(**kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, num_masks=3, image_size=16, mask_width=8,
                                objective=BYOL(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32), lr=0.05,
                                mask_lr=0.05, warmup_epochs=0, nonfinite="skip")
    args.update(kw)
    return ADIOSModule(**args)


def _loader(nan_batch: int | None = None, batches: int = 3) -> DataLoader:
    data = TwoViewTensors(8 * batches, size=16)
    if nan_batch is not None:
        data.x1[8 * nan_batch, 0, 3, 3] = float("nan")  # one pixel
    return DataLoader(data, batch_size=8, shuffle=False)


class Snapshots(pl.Callback):
    """Everything a batch can change, before and after each batch."""

    def __init__(self) -> None:
        self.before: list[dict[str, Any]] = []
        self.after: list[dict[str, Any]] = []

    @staticmethod
    def _take(trainer: pl.Trainer, module: ADIOSModule) -> dict[str, Any]:
        probe = next((c for c in trainer.callbacks if isinstance(c, OnlineLinearProbe)), None)
        return {
            "module": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "optimizers": [{k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()} for opt in trainer.optimizers],
            "probe": {k: v.clone() for k, v in probe.head.state_dict().items()} if probe and probe.head is not None else {},
            "global_step": trainer.global_step,
        }

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self.before.append(self._take(trainer, module))

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.after.append(self._take(trainer, module))


def _same_buffers(x: dict[int, torch.Tensor], y: dict[int, torch.Tensor]) -> bool:
    """Equal momentum buffers, an absent one counting as zeros: a skipped first batch leaves a
    zero buffer, with which SGD's next step (``0 * m + g``) is exactly a fresh buffer's (``g``)."""
    for k in x.keys() | y.keys():
        like = x[k] if k in x else y[k]
        if not torch.equal(x.get(k, torch.zeros_like(like)), y.get(k, torch.zeros_like(like))):
            return False
    return True


def _same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    diffs = [k for k in a["module"] if not torch.equal(a["module"][k], b["module"][k])]
    diffs += [f"optimizer {i}" for i, (x, y) in enumerate(zip(a["optimizers"], b["optimizers"])) if not _same_buffers(x, y)]
    diffs += [f"probe {k}" for k in a["probe"] if not torch.equal(a["probe"][k], b["probe"][k])]
    return diffs


@pytest.mark.parametrize("masked_views", ["sequential", "batched"])
def test_one_nan_pixel_leaves_every_state_untouched_and_counts_the_batch(masked_views: str) -> None:
    snaps = Snapshots()
    model = _model(masked_views=masked_views)
    trainer = quiet_trainer(max_steps=3, callbacks=[OnlineLinearProbe(num_classes=4), snaps], limit_val_batches=0)
    trainer.fit(model, _loader(nan_batch=1))
    assert trainer.global_step == 3 and model.skipped_batches == 1
    assert float(trainer.callback_metrics["train/skipped_batches"]) == 1
    assert _same(snaps.before[1], snaps.after[1]) == [], "the skipped batch changed state"
    assert snaps.after[1]["global_step"] == snaps.before[1]["global_step"] + 1, "the skipped batch was not counted"
    assert _same(snaps.before[2], snaps.after[2]), "the batch after it did not train"
    running = [v for k, v in model.state_dict().items() if "running" in k]
    assert running and all(torch.isfinite(v).all() for v in running), "BatchNorm statistics took the NaN"


def test_nonfinite_gradient_with_finite_loss_is_caught() -> None:
    def poison(grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))

    model = _model(nonfinite="raise")
    model.encoder.parameters().__next__().register_hook(poison)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, _loader())
    model = _model()
    next(model.mask_generator.parameters()).register_hook(poison)  # only the mask player's gradient
    snaps = Snapshots()
    trainer = quiet_trainer(max_steps=2, callbacks=[snaps], limit_val_batches=0)
    trainer.fit(model, _loader())
    assert model.skipped_batches == 2 and trainer.global_step == 2
    assert _same(snaps.before[0], snaps.after[-1]) == [], "a failed mask step left the encoder's update in place"


def test_a_run_that_skips_every_batch_still_ends_at_max_steps() -> None:
    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            with torch.no_grad():
                next(module.objective.projector.parameters()).fill_(float("nan"))

    model = _model()
    trainer = quiet_trainer(max_steps=3, callbacks=[Poison()], limit_val_batches=0)
    trainer.fit(model, _loader(batches=10))
    assert trainer.global_step == 3 and model.skipped_batches == 3


def test_skipped_batches_survive_a_resume(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    model = _model()
    quiet_trainer(max_steps=3, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0).fit(model, _loader(nan_batch=1))
    assert model.skipped_batches == 1
    resumed = _model()
    quiet_trainer(max_steps=6, limit_val_batches=0).fit(resumed, _loader(batches=6), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.skipped_batches == 1


def test_gradient_norm_is_the_norm_of_all_gradients_joined() -> None:
    """The logged gradient norm against the plain definition: the L2 norm of every gradient
    entry, the parameters without a gradient left out."""
    from adios_pl.nonfinite import gradient_norm

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((4, 3), (5,), (2, 2, 3), (7,))]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g)
    want = torch.cat([p.grad.flatten() for p in params[:3]]).double().square().sum().sqrt()  # type: ignore[union-attr]
    norm = gradient_norm(params)
    assert norm is not None and float(norm) == pytest.approx(float(want), rel=1e-6)
    assert gradient_norm(params[3:]) is None


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_skipped_first_step_leaves_the_optimiser_as_if_fresh(name: str) -> None:
    """State the skipped batch created (the first momentum buffer, Adam's moments) is put back to
    zeros, which is what a fresh state amounts to, not kept with the batch's NaN in it."""
    from adios_pl.nonfinite import StateSnapshot

    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9) if name == "sgd" else torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    snapshot = StateSnapshot(layer, [opt])
    layer(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    opt.step()
    snapshot.restore_unless(torch.tensor(False))
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert tensors and all(torch.equal(v, torch.zeros_like(v)) for v in tensors)
