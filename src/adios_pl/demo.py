"""``adios-pl demo``: SimCLR + ADIOS on the built-in Shapes data, on the CPU, in minutes.

It prints what the networks achieve at initialisation and after training, so one can see that
ADIOS learned something: kNN and linear top-1 of the encoder, and the foreground ARI of the
masks against random patch masks.

The budget is time, and the run ends as a training run does, with its learning rates annealed:
a copy of the demo first trains a few batches and validates a few, timed, and the schedule is
then laid over as many batches as that says fit in the rest of the budget. A schedule laid over
a fixed long run instead stops at its peak learning rate, wherever the budget ends, and there
the encoder's kNN moved by up to 5 points within a few batches (``benchmarks/demo_steps.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import shlex
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from adios_pl.backend import ModelCheckpoint, TensorBoardLogger, pl
from adios_pl.callbacks import MaskQuality, MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.data import ShapesDataModule, SSLDataModule
from adios_pl.evaluation import evaluate_encoder
from adios_pl.metrics import foreground_ari, random_patch_segmentation
from adios_pl.modes import eval_mode
from adios_pl.module import ADIOSModule
from adios_pl.objectives import SimCLR


class TrainSpeed(pl.Callback):
    """Training images per second, validation excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Start the batch's clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Add the batch's time and its images (not views)."""
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch[1])

    @property
    def images_per_second(self) -> float:
        """Mean training throughput so far."""
        return self.images / self.seconds if self.seconds else 0.0


#: Batches the timing copy trains and validates (of each evaluation loader); the first is not timed.
TIMED_TRAIN_BATCHES = 8
TIMED_VAL_BATCHES = 4
#: The share of the budget the planned batches and validations may fill: room for the clocks' noise.
#: A run the budget stops early anyway stops in the schedule's tail (at 95 % of it the learning
#: rates are under 1 % of their peak).
BUDGET_SHARE = 0.95


class BatchClock(pl.Callback):
    """Seconds between consecutive training batch ends, and between consecutive validation batch
    ends of each evaluation loader: loading, the step and the callbacks' work, each batch's whole
    cost. The first batch after a start (of training, of a validation, of a loader) is not timed.
    ``validation_seconds`` is the last validation's whole time, start-up and scoring included."""

    def __init__(self, stop_after_validation: bool = False) -> None:
        self.train: list[float] = []
        self.val: dict[int, list[float]] = {}
        self.validation_seconds = 0.0
        self.stop_after_validation = stop_after_validation
        self._last = 0.0
        self._validation_started = 0.0

    def _tick(self, into: list[float]) -> None:
        now = time.perf_counter()
        if self._last:
            into.append(now - self._last)
        self._last = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Time since the last training batch ended."""
        self._tick(self.train)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation's clock starts afresh."""
        self._last = 0.0
        self._validation_started = time.perf_counter()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Time since the last validation batch of the same loader ended."""
        if dataloader_idx not in self.val:
            self.val[dataloader_idx], self._last = [], 0.0
        self._tick(self.val[dataloader_idx])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training's clock starts afresh; with ``stop_after_validation`` the fit ends here."""
        self.validation_seconds = time.perf_counter() - self._validation_started
        self._last = 0.0
        trainer.should_stop = trainer.should_stop or self.stop_after_validation


def batches_that_fit(seconds: float, batch_seconds: float, validation_seconds: float, batches_per_epoch: int) -> int:
    """How many training batches fit in ``seconds`` when each takes ``batch_seconds`` and every
    ``batches_per_epoch``-th is followed by a validation of ``validation_seconds`` (at least 1)."""
    if batch_seconds <= 0 or validation_seconds < 0 or batches_per_epoch < 1:
        raise ValueError(f"batch_seconds must be > 0, validation_seconds >= 0 and batches_per_epoch >= 1; "
                         f"got {batch_seconds}, {validation_seconds}, {batches_per_epoch}")
    epoch_seconds = batches_per_epoch * batch_seconds + validation_seconds
    epochs = math.floor(seconds / epoch_seconds)
    rest = seconds - epochs * epoch_seconds
    return max(1, epochs * batches_per_epoch + min(batches_per_epoch, math.floor(rest / batch_seconds)))


def whole_validation_seconds(clock: BatchClock, lengths: list[int]) -> float:
    """A whole validation's seconds from ``clock``'s shortened one: its measured time, plus the
    batches of each loader (of ``lengths``) that it did not reach, at that loader's median batch
    time. A loader it did not reach at all counts as free."""
    total = clock.validation_seconds
    for index, length in enumerate(lengths):
        times = clock.val.get(index)
        if times is not None:  # reached: the first batch untimed, the others timed
            total += (length - min(length, len(times) + 1)) * statistics.median(times or [0.0])
    return total


def plan_batches(seconds: float, tiny: bool = False, seed: int = 0, mask_mode: str = "all") -> tuple[int, float]:
    """How many batches the demo trains in ``seconds``, and the seconds that planning took.

    A copy of the demo (its model, data and callbacks) trains :data:`TIMED_TRAIN_BATCHES` batches
    and validates :data:`TIMED_VAL_BATCHES` of each evaluation loader. The median time of a
    training batch, and the validation's whole time plus each loader's batches it did not reach
    at that loader's median, give :func:`batches_that_fit` for what is left of ``seconds`` times
    :data:`BUDGET_SHARE`. Never fewer batches than the warm-up needs to end.
    """
    started = time.perf_counter()
    model, data = demo_parts(tiny=tiny, seed=seed, mask_mode=mask_mode)
    clock = BatchClock(stop_after_validation=True)
    with _quiet_lightning():
        trainer = pl.Trainer(  # the demo's schedule (a short max_steps would warn that warm-up outlasts it)
            accelerator="cpu", devices=1, max_epochs=1000, val_check_interval=TIMED_TRAIN_BATCHES,
            check_val_every_n_epoch=None, limit_val_batches=TIMED_VAL_BATCHES, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[*_online_callbacks(), clock],
        )
        trainer.fit(model, data)
    per_epoch = int(trainer.num_training_batches)
    batch_seconds = statistics.median(clock.train)
    validation_seconds = whole_validation_seconds(clock, [len(loader) for loader in data.val_dataloader()])
    spent = time.perf_counter() - started
    planned = batches_that_fit(BUDGET_SHARE * (seconds - spent), batch_seconds, validation_seconds, per_epoch)
    warmup = math.ceil(model.hparams["warmup_epochs"] * per_epoch)
    return max(planned, warmup + 1), spent


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's notes on the timing copy's Trainer (accelerators found, ...) left out: the
    demo's own Trainer prints them."""
    lightning = logging.getLogger(pl.__name__)
    level = lightning.level
    lightning.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lightning.setLevel(level)


def _online_callbacks() -> list[pl.Callback]:
    """The demo's online evaluation: linear probe, kNN and mask quality."""
    return [OnlineLinearProbe(num_classes=4), OnlineKNN(k=200, temperature=0.07), MaskQuality()]


def demo_model(encoder: str = "small_cnn", width: int = 16, **overrides: Any) -> ADIOSModule:
    """The demo's SimCLR + ADIOS model (N=4, AdamW); ``overrides`` replace any argument.

    The quality benchmark builds its variants (baseline, ADIOS-s, random masks) from this too.
    """
    args: dict[str, Any] = dict(
        encoder=encoder, encoder_kwargs={"width": width} if encoder == "small_cnn" else {},
        objective=SimCLR(temperature=0.2, proj_hidden_dim=512, proj_output_dim=128),
        num_masks=4, mask_mode="all", image_size=32, mask_width=8, mask_norm="gn", sparsity_weight=1.0,
        optimizer="adamw", lr=2e-3, mask_lr=1e-3, weight_decay=1e-4, warmup_epochs=0.5,
    )
    args.update(overrides)
    return ADIOSModule(**args)


def demo_parts(tiny: bool = False, seed: int = 0, num_workers: int = 2, mask_mode: str = "all") -> tuple[ADIOSModule, ShapesDataModule]:
    """The demo's model and data (``tiny`` shrinks both for tests)."""
    pl.seed_everything(seed, verbose=False)
    data = ShapesDataModule(
        train_size=64 if tiny else 8192, val_size=32 if tiny else 1024, batch_size=16 if tiny else 128,
        num_workers=0 if tiny else num_workers, pin_memory=False,
    )
    return demo_model(width=8 if tiny else 16, mask_mode=mask_mode), data


@torch.no_grad()
def measure(model: ADIOSModule, data: SSLDataModule, probe_epochs: int = 30) -> dict[str, float]:
    """Offline kNN and linear top-1 of the encoder; FG-ARI of the masks and of random patches.

    Features, the probe and kNN are computed on the model's device.
    """
    device = model.device
    val, _ = data.val_dataloader()
    result: dict[str, float] = {}
    with eval_mode(model):
        if len(val.dataset[0]) > 2 and model.mask_generator is not None:  # data with segmentations
            segmentations = torch.cat([b[2] for b in val])
            images = torch.cat([b[0] for b in val])
            predicted = torch.cat([model.mask_generator(x.to(device)).argmax(1).cpu() for x in images.split(256)])
            random = random_patch_segmentation(len(images), images.shape[-1], model.num_masks, 8, torch.Generator().manual_seed(0))
            result["mask_fg_ari"] = float(foreground_ari(predicted, segmentations).nanmean())
            result["random_patch_fg_ari"] = float(foreground_ari(random, segmentations).nanmean())
        with torch.enable_grad():
            result.update(evaluate_encoder(model.encoder, data, device, epochs=probe_epochs))
    return result


def run_demo(out: str = "runs/demo", minutes: float = 3.0, max_steps: int = -1, tiny: bool = False, seed: int = 0, mask_mode: str = "all") -> dict[str, Any]:
    """Train the demo, print the table, and return the figures."""
    started = time.perf_counter()
    out_dir = Path(out)
    variant = "ADIOS" if mask_mode == "all" else "ADIOS-s"
    budget = minutes * 60
    plan = ""
    if max_steps < 0:
        print(f"adios-pl demo: timing a few batches to fit the schedule to the {minutes:g}-minute budget")
        max_steps, spent = plan_batches(budget, tiny=tiny, seed=seed, mask_mode=mask_mode)
        budget -= spent
        plan = f", {max_steps} batches planned (timing took {spent:.0f} s)"
    model, data = demo_parts(tiny=tiny, seed=seed, mask_mode=mask_mode)  # seeded: as if no copy had trained
    data.setup("fit")
    print(f"adios-pl demo: SimCLR + {variant} (N={model.num_masks}) on Shapes, {data.train_size} scenes, CPU, budget {minutes:g} min{plan}")
    before = measure(model, data, probe_epochs=5 if tiny else 30)
    speed = TrainSpeed()
    checkpoint = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=0)
    visualizer = MaskVisualizer(num_images=8, out_dir=str(out_dir / "masks"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps,
        max_time={"seconds": max(1, int(budget))}, logger=TensorBoardLogger(str(out_dir), name="tensorboard"),
        callbacks=[*_online_callbacks(), visualizer, checkpoint, speed],
        log_every_n_steps=10, num_sanity_val_steps=0, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    online = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    after = measure(model, data, probe_epochs=5 if tiny else 30)
    trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", weights_only=False)  # a full checkpoint, to resume from
    picture = out_dir / "masks.png"
    if visualizer.last_path is not None:
        shutil.copyfile(visualizer.last_path, picture)
    result = {
        "before": before, "after": after, "online": online, "steps": trainer.global_step,
        "images_per_second": speed.images_per_second, "wall_seconds": time.perf_counter() - started,
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"\nmask picture:     {picture}")
    print(f"checkpoint:       {out_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"offline scores:   {evaluate_command(out_dir / 'checkpoints' / 'last.ckpt', data, probe_epochs=5 if tiny else 30)}")
    print(f"TensorBoard logs: tensorboard --logdir {out_dir / 'tensorboard'}")
    return result


def evaluate_command(checkpoint: Path, data: ShapesDataModule, probe_epochs: int) -> str:
    """The ``adios-pl evaluate`` command that scores ``checkpoint`` on the demo's data as the table's
    offline rows do (the settings that differ from ``ShapesDataModule``'s defaults are spelt out)."""
    defaults = inspect.signature(ShapesDataModule.__init__).parameters
    flags = [f"--data.{name} {getattr(data, name)}" for name in ("train_size", "val_size", "batch_size")
             if getattr(data, name) != defaults[name].default]
    return " ".join(["adios-pl evaluate --ckpt_path", shlex.quote(str(checkpoint)), "--data ShapesDataModule", *flags,
                     f"--evaluate.epochs {probe_epochs}"])


def format_table(result: dict[str, Any]) -> str:
    """The demo's summary table."""
    b, a, o = result["before"], result["after"], result["online"]
    rows = [
        ("kNN top-1 (k=200, offline)", b["knn_top1"], a["knn_top1"]),
        ("linear top-1 (offline probe)", b["linear_top1"], a["linear_top1"]),
        ("linear top-1 (online probe)", float("nan"), o.get("val/linear_top1", float("nan"))),
        ("mask FG-ARI", b["mask_fg_ari"], a["mask_fg_ari"]),
        ("random 8-px patch FG-ARI", b["random_patch_fg_ari"], a["random_patch_fg_ari"]),
    ]
    lines = [f"\n{'':32s} {'at init':>9s} {'trained':>9s}", "-" * 52]
    lines += [f"{name:32s} {x:9.3f} {y:9.3f}".replace("nan", "  -") for name, x, y in rows]
    lines.append("-" * 52)
    lines.append(f"{result['steps']} steps, {result['images_per_second']:.0f} training images/s, wall time {result['wall_seconds'] / 60:.1f} min")
    return "\n".join(lines)


def run_demo_cli(argv: Sequence[str]) -> int:
    """``adios-pl demo [--minutes M] [--max-steps S] [--out DIR] [--tiny] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="adios-pl demo", description=__doc__, allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="training time budget (default 3): the schedule is laid over the batches a timed copy says fit in it")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="train this many batches instead, the schedule laid over them (the budget still stops the run)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data set (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-mode", choices=["all", "one"], default="all", help="all = ADIOS, one = ADIOS-s")
    args = parser.parse_args(list(argv))
    run_demo(out=args.out, minutes=args.minutes, max_steps=args.max_steps, tiny=args.tiny, seed=args.seed, mask_mode=args.mask_mode)
    return 0
