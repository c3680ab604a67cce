"""``adios-pl demo``: SimCLR + ADIOS on the built-in Shapes data, on the CPU, in minutes.

It prints what the networks achieve at initialisation and after training, so one can see that
ADIOS learned something: kNN and linear top-1 of the encoder, and the foreground ARI of the
masks against random patch masks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from adios_pl.backend import ModelCheckpoint, TensorBoardLogger, pl
from adios_pl.callbacks import MaskQuality, MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.data import SSLDataModule, ShapesDataModule
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
    model, data = demo_parts(tiny=tiny, seed=seed, mask_mode=mask_mode)
    data.setup("fit")
    variant = "ADIOS" if mask_mode == "all" else "ADIOS-s"
    print(f"adios-pl demo: SimCLR + {variant} (N={model.num_masks}) on Shapes, {data.train_size} scenes, CPU, budget {minutes:g} min")
    before = measure(model, data, probe_epochs=5 if tiny else 30)
    speed = TrainSpeed()
    checkpoint = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=0)
    visualizer = MaskVisualizer(num_images=8, out_dir=str(out_dir / "masks"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1000 if max_steps < 0 else -1, max_steps=max_steps,
        max_time={"seconds": int(minutes * 60)}, logger=TensorBoardLogger(str(out_dir), name="tensorboard"),
        callbacks=[OnlineLinearProbe(num_classes=4), OnlineKNN(k=200, temperature=0.07), MaskQuality(), visualizer, checkpoint, speed],
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
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many batches")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data set (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-mode", choices=["all", "one"], default="all", help="all = ADIOS, one = ADIOS-s")
    args = parser.parse_args(list(argv))
    run_demo(out=args.out, minutes=args.minutes, max_steps=args.max_steps, tiny=args.tiny, seed=args.seed, mask_mode=args.mask_mode)
    return 0
