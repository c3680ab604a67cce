"""Exact resume, kills, atomic checkpoints, guarded numerics."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineLinearProbe
from adios_pl.objectives import BYOL, SimCLR
from adios_pl.optim import warmup_cosine

from conftest import StopAt, make_loader, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str = "simclr", **kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    objective = BYOL(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32) if name == "byol" else SimCLR(proj_hidden_dim=32, proj_output_dim=16)
    args: dict[str, Any] = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, objective=objective, num_masks=3, image_size=16,
                                mask_width=8, lr=0.05, mask_lr=0.05, warmup_epochs=0.5)
    args.update(kw)
    return ADIOSModule(**args)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append((trainer.global_step - 1, float(trainer.callback_metrics["train/lr"])))


def _state(model: ADIOSModule, probe: OnlineLinearProbe) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["probe"] = probe.linear.weight.detach().clone()
    return state


@pytest.mark.parametrize(("name", "mode"), [("simclr", "all"), ("byol", "all"), ("simclr", "one")])
def test_resume_at_epoch_boundary_is_exact(tmp_path: Path, name: str, mode: str) -> None:
    loader = lambda: make_loader(n=24, batch_size=8, size=16)  # noqa: E731 - 3 batches an epoch
    straight_probe = OnlineLinearProbe(num_classes=4)
    straight = _model(name, mask_mode=mode)
    pl.seed_everything(1)
    quiet_trainer(max_epochs=2, callbacks=[straight_probe], limit_val_batches=0).fit(straight, loader())

    first_probe = OnlineLinearProbe(num_classes=4)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    first = _model(name, mask_mode=mode)
    pl.seed_everything(1)
    quiet_trainer(max_epochs=2, callbacks=[first_probe, ckpt, StopAt(3)], enable_checkpointing=True, limit_val_batches=0).fit(first, loader())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3

    resumed_probe = OnlineLinearProbe(num_classes=4)
    resumed = _model(name, mask_mode=mode)
    pl.seed_everything(2)  # a different global seed: everything that matters comes from the checkpoint
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed_probe], limit_val_batches=0)
    trainer.fit(resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 6
    a, b = _state(straight, straight_probe), _state(resumed, resumed_probe)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), f"{k} differs after resume"


def test_resume_mid_epoch_keeps_schedules_and_counters(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_last=True, save_top_k=0)
    quiet_trainer(max_steps=8, callbacks=[ckpt, StopAt(3)], enable_checkpointing=True, limit_val_batches=0).fit(
        _model(), make_loader(n=40, batch_size=8, size=16))  # 5 batches an epoch; last.ckpt at step 2
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    record = RecordLR()
    trainer = quiet_trainer(max_steps=8, callbacks=[record], limit_val_batches=0)
    trainer.fit(_model(), make_loader(n=40, batch_size=8, size=16), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 8
    steps = [s for s, _ in record.rows]
    assert steps == list(range(2, 8))
    warmup = round(0.5 * 5)
    for s, lr in record.rows:
        assert lr == pytest.approx(0.05 * warmup_cosine(s, warmup, 8)), s


KILLED_RUN = textwrap.dedent("""
    import sys, pytorch_lightning as pl
    sys.path.insert(0, {tests!r})
    from pytorch_lightning.callbacks import ModelCheckpoint
    from test_reliability import _model
    from conftest import StopAt, make_loader, quiet_trainer

    class Beat(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            open({beat!r}, "w").write(str(trainer.global_step))

    ckpt = ModelCheckpoint(dirpath={out!r}, every_n_train_steps=2, save_last=True, save_top_k=0)
    quiet_trainer(max_steps=10_000, callbacks=[ckpt, Beat()], enable_checkpointing=True, limit_val_batches=0).fit(
        _model(), make_loader(n=64, batch_size=8, size=16))
""")


def test_sigkill_mid_epoch_then_resume(tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    script = KILLED_RUN.format(tests=str(ROOT / "tests"), beat=str(beat), out=str(tmp_path / "ck"))
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 120
        while (time.time() < deadline and process.poll() is None
               and not (beat.exists() and beat.read_text().strip() and int(beat.read_text()) >= 5)):
            time.sleep(0.05)
        exited = process.poll()  # on its own, before the kill: the run failed
        process.send_signal(signal.SIGKILL)  # (nothing if it has ended)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert exited is None, f"the run to kill ended on its own (exit status {exited}):\n{errors.read_text()[-3000:]}"
    assert beat.exists(), f"the run trained no batch in 120 s:\n{errors.read_text()[-3000:]}"
    killed_at = int(beat.read_text())
    assert killed_at >= 5, "the run did not get going"
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at - saved <= 2, f"lost {killed_at - saved} steps, more than the checkpoint interval"
    trainer = quiet_trainer(max_steps=saved + 2, limit_val_batches=0)
    trainer.fit(_model(), make_loader(n=64, batch_size=8, size=16), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert trainer.global_step == saved + 2


def test_checkpoint_write_is_atomic_and_loads_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = quiet_trainer(max_steps=1, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(_model(), make_loader(n=8, size=16))
    good = (tmp_path / "last.ckpt").read_bytes()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1

    def dies_half_way(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.parametrize(("kwargs", "match"), [(dict(num_masks=4), "num_masks: checkpoint 3, this model 4"),
                                               (dict(name="byol"), "objective: checkpoint 'SimCLR', this model 'BYOL'"),
                                               (dict(mask_width=16), "mask_width")])
def test_checkpoint_of_another_configuration_fails_clearly(tmp_path: Path, kwargs: dict, match: str) -> None:
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(_model(), make_loader(n=8, size=16))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    name = kwargs.pop("name", "simclr")
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(_model(name, **kwargs), make_loader(n=8, size=16), ckpt_path=str(tmp_path / "a.ckpt"))


def test_saturated_masks_stay_finite_through_a_step() -> None:
    model = _model(sparsity_weight=1.0, entropy_weight=0.5)
    with torch.no_grad():  # slot 0 covers everything, the others nothing
        model.mask_generator.head.bias.copy_(torch.tensor([60.0, -60.0, -60.0]))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, make_loader(n=16, size=16))
    assert float(trainer.callback_metrics["train/sparsity_penalty"]) > 1e6  # large but finite
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


class PoisonOnce(pl.Callback):
    """Makes batch 1's encoder loss NaN by poisoning the projector's weights for one step."""

    def on_train_batch_start(self, trainer: pl.Trainer, module: ADIOSModule, batch: Any, batch_idx: int) -> None:
        layer = module.objective.projector.layers[0]
        if batch_idx == 1:
            self.saved = layer.weight.detach().clone()
            with torch.no_grad():
                layer.weight.fill_(float("nan"))
        elif batch_idx == 2:
            with torch.no_grad():
                layer.weight.copy_(self.saved)


def test_nonfinite_loss_raises_with_context_or_is_skipped() -> None:
    with pytest.raises(FloatingPointError, match=r"batch 1 .*train/encoder_loss=nan.*last finite values: train/encoder_loss="):
        quiet_trainer(max_steps=3, callbacks=[PoisonOnce()], limit_val_batches=0).fit(_model(), make_loader(n=24, size=16))
    model = _model(nonfinite="skip")
    trainer = quiet_trainer(max_steps=3, callbacks=[PoisonOnce()], limit_val_batches=0)
    trainer.fit(model, make_loader(n=24, size=16))
    assert model.skipped_batches == 1 and float(trainer.callback_metrics["train/skipped_batches"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ReadBackCounter(ADIOSModule):
    """Reads the non-finite record back every 50 batches, as on a GPU."""

    def _readback_interval(self) -> int:
        return 50


def test_on_an_accelerator_the_nonfinite_check_is_read_back_late_but_names_the_first_bad_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No read-back per batch: the error comes at the epoch's end (or before a checkpoint) and
    still names batch 1 and its values, although later batches were non-finite too."""
    from adios_pl import nonfinite

    reads = []
    original = nonfinite.FirstFailure.raise_if_any
    monkeypatch.setattr(nonfinite.FirstFailure, "raise_if_any", lambda self: (reads.append(1), original(self))[1])
    torch.manual_seed(0)
    model = ReadBackCounter(
        encoder="small_cnn", encoder_kwargs={"width": 8}, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16),
        num_masks=3, image_size=16, mask_width=8, lr=0.05, mask_lr=0.05, warmup_epochs=0.5,
    )
    batches = []
    probe = pl.Callback()
    probe.on_train_batch_end = lambda trainer, *a: batches.append(trainer.global_step)  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError, match=r"batch 1 \(epoch 0\): train/encoder_loss=nan"):
        quiet_trainer(max_epochs=1, callbacks=[PoisonOnce(), probe], limit_val_batches=0).fit(model, make_loader(n=24, size=16))
    assert len(batches) == 3, "training went on to the end of the epoch before reading back"
    assert len(reads) == 1, f"{len(reads)} read-backs for one epoch of 3 batches"


class LogsEveryThird(ADIOSModule):
    """Reads back and logs every third batch, as on a GPU with log_every_n_steps=3."""

    def _readback_interval(self) -> int:
        return 3


def test_logging_only_when_the_logger_writes_gives_the_same_log(tmp_path: Path) -> None:
    """On an accelerator the step calls self.log only every log_every_n_steps batches (each call
    costs host time); what the logger writes is the same as logging every batch."""
    from pytorch_lightning.loggers import CSVLogger

    def logged(cls: type, folder: str) -> list[dict[str, str]]:
        torch.manual_seed(0)
        model = cls(encoder="small_cnn", encoder_kwargs={"width": 8}, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16),
                    num_masks=3, image_size=16, mask_width=8, lr=0.05, mask_lr=0.05, warmup_epochs=0.5)
        logger = CSVLogger(tmp_path, name=folder)
        quiet_trainer(max_steps=7, limit_val_batches=0, logger=logger, log_every_n_steps=3).fit(model, make_loader(n=8 * 7, size=16))
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            return list(csv.DictReader(f))

    every, third = logged(ADIOSModule, "every"), logged(LogsEveryThird, "third")
    assert [row["step"] for row in every] == ["2", "5"], every
    assert every == third
    assert {"train/encoder_loss", "train/lr", "train/mask_lr", "train/skipped_batches"} <= set(every[0])


def test_mask_collapse_is_warned_once() -> None:
    model = _model(sparsity_weight=0.0, mask_lr=1e-9)
    with torch.no_grad():
        model.mask_generator.head.bias.copy_(torch.tensor([50.0, -50.0, -50.0]))
    with pytest.warns(UserWarning, match="mask collapse.*sparsity_weight") as record:
        quiet_trainer(max_epochs=2, limit_val_batches=0).fit(model, make_loader(n=16, size=16))
    assert sum("mask collapse" in str(w.message) for w in record) == 1


class ScheduledCollapse(torch.nn.Module):
    """Soft masks where the first ``share`` of each batch's images is collapsed (slot shares 0.99,
    0.005, 0.005) and the rest spread (0.5, 0.3, 0.2); ``share`` is set per batch by the test."""

    num_masks = 3

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([[0.99, 0.005, 0.005], [0.5, 0.3, 0.2]]).log())
        self.share = 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        collapsed = torch.arange(images.shape[0]) < round(self.share * images.shape[0])
        shares = self.logits.softmax(1)[torch.where(collapsed, 0, 1)]
        return shares[:, :, None, None].expand(-1, -1, *images.shape[-2:])


@pytest.mark.parametrize(("shares", "warned"), [
    ((1.0, 1.0, 1.0, 1.0), True),  # every image of every step: collapse
    ((0.75, 0.75, 0.75, 0.75), False),  # a quarter of the images keep their masks
    ((1.0, 1.0, 1.0, 0.0), False),  # the last step of the epoch is not collapsed
])
def test_mask_collapse_is_warned_only_when_nine_in_ten_images_collapse_in_every_step(shares: tuple[float, ...], warned: bool) -> None:
    generator = ScheduledCollapse()

    class Schedule(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
            generator.share = shares[batch_idx]

    model = _model(mask_generator=generator, mask_lr=1e-9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Schedule()])
        trainer.fit(model, make_loader(n=32, size=16))
    assert float(trainer.callback_metrics["train/mask_collapsed_fraction"]) == shares[-1], "the schedule reached the masks"
    assert any("mask collapse" in str(w.message) for w in record) == warned


class ConstantMasks(torch.nn.Module):
    """Soft masks that give slot ``n`` the share ``shares[n]`` of every pixel: areas exactly ``shares``."""

    def __init__(self, shares: tuple[float, ...]) -> None:
        super().__init__()
        self.num_masks = len(shares)
        self.logits = torch.nn.Parameter(torch.tensor(shares).log())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.softmax(0).view(1, -1, 1, 1).expand(images.shape[0], -1, *images.shape[-2:])


@pytest.mark.parametrize(("shares", "collapsed"), [((0.96, 0.03, 0.01), 0.0), ((0.98, 0.015, 0.005), 1.0)])
@pytest.mark.filterwarnings("ignore:mask collapse")
def test_an_image_counts_as_collapsed_when_its_second_largest_mask_covers_under_2_percent(shares: tuple[float, ...], collapsed: float) -> None:
    model = _model(mask_generator=ConstantMasks(shares), mask_lr=1e-9)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, make_loader(n=8, size=16))
    assert float(trainer.callback_metrics["train/mask_collapsed_fraction"]) == collapsed
