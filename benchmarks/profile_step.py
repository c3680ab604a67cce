"""Profile training steps of the real Trainer loop on a GPU: top kernels, GPU idle fraction and
host synchronisations per step.

Trains ResNet18 ADIOS (or a variant) on an image folder with OnlineKNN and OnlineLinearProbe;
after ``--warmup`` batches it profiles ``--steps`` batches with ``torch.profiler`` and, at the
same time, counts the host synchronisations that ``torch.cuda.set_sync_debug_mode`` reports,
with the Python line that caused each. Writes a Markdown summary to ``--out``.

    python benchmarks/profile_step.py --data-dir /data/cifar10/train --augment-on device --out profile.md
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile

from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineKNN, OnlineLinearProbe
from adios_pl.data import ImageFolderDataModule
from train_speed import VARIANTS  # benchmarks/train_speed.py


CUDA = torch.cuda.is_available()  # without, the script runs (for a dry run) but counts nothing on a GPU


def _synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepProfiler(pl.Callback):
    """Profiles batches ``warmup .. warmup + steps - 1`` and counts host synchronisations there."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.prof: Any = None
        self.syncs: collections.Counter[str] = collections.Counter()
        self.wall = 0.0
        self._old_showwarning: Any = None

    def _on_warning(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        ours = [f for f in frames if "adios_pl" in f.filename or "benchmarks" in f.filename]
        where = ours[-1] if ours else frames[-1]
        library = frames[-1]
        self.syncs[f"{where.filename.split('/site-packages/')[-1].split('/src/')[-1]}:{where.lineno} ({where.name})"
                   f" via {library.filename.split('/')[-1]}:{library.lineno}"] += 1

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.prof is None:
            _synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else []))
            self.prof.__enter__()
            self._old_showwarning = warnings.showwarning
            warnings.showwarning = self._on_warning  # type: ignore[assignment]
            warnings.simplefilter("always")
            if CUDA:
                torch.cuda.set_sync_debug_mode("warn")
            self.wall = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.prof is not None and self._old_showwarning is not None and trainer.global_step >= self.warmup + self.steps:
            if CUDA:
                torch.cuda.set_sync_debug_mode("default")
            _synchronize()
            self.wall = time.perf_counter() - self.wall
            warnings.showwarning = self._old_showwarning
            self._old_showwarning = None
            self.prof.__exit__(None, None, None)
            trainer.should_stop = True


def summary(args: argparse.Namespace, profiler: StepProfiler) -> str:
    events = profiler.prof.key_averages()

    def device_time(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))

    kernels = sorted((e for e in events if device_time(e) > 0), key=device_time, reverse=True)
    # the host's launch calls (compare with benchmarks/ops_per_step.py, counted on the CPU)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key or e.key in ("cudaMemcpyAsync", "cudaMemsetAsync"))
    busy = sum(device_time(e) for e in kernels) / 1e6
    steps = args.steps
    lines = [
        f"## {args.variant}, augment_on={args.augment_on}, {args.label}".rstrip(", "),
        "",
        f"{torch.cuda.get_device_name() if CUDA else 'CPU'}, ResNet18, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
        f"N={args.num_masks}; {steps} steps after {args.warmup}, Trainer loop with data, OnlineKNN, OnlineLinearProbe.",
        "",
        f"- wall time per step: {profiler.wall / steps * 1e3:.1f} ms ({args.batch_size * steps / profiler.wall:.0f} images/s)",
        f"- GPU busy per step (sum of kernel times): {busy / steps * 1e3:.1f} ms; idle fraction {max(0.0, 1 - busy / profiler.wall):.0%}",
        f"- host synchronisations per step: {sum(profiler.syncs.values()) / steps:.1f}",
        f"- kernel launches (and asynchronous copies/memsets) per step: {launches / steps:.0f}",
    ]
    for where, count in profiler.syncs.most_common(8):
        lines.append(f"  - {count / steps:.1f} per step at {where}")
    lines += ["", "| kernel | GPU ms per step | share |", "|---|---|---|"]
    for e in kernels[:10]:
        lines.append(f"| `{e.key[:90]}` | {device_time(e) / 1e3 / steps:.2f} | {device_time(e) / 1e6 / busy:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--variant", choices=list(VARIANTS), default="adios")
    parser.add_argument("--augment-on", choices=["host", "device"], default="device")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    place = {"augment_on": args.augment_on} if args.augment_on != "host" else {}
    datamodule = ImageFolderDataModule(train_dir=args.data_dir, image_size=args.image_size, batch_size=args.batch_size,
                                       num_workers=args.num_workers, **place)
    settings: dict[str, Any] = {"num_masks": args.num_masks, **VARIANTS[args.variant]}
    model = ADIOSModule(encoder="resnet18", image_size=args.image_size, warmup_epochs=0, **settings)
    profiler = StepProfiler(args.warmup, args.steps)
    trainer = pl.Trainer(
        accelerator="gpu" if CUDA else "cpu", devices=1, precision=args.precision, max_steps=args.warmup + args.steps + 1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, benchmark=True,
        callbacks=[OnlineKNN(), OnlineLinearProbe(num_classes=10), profiler], num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    print("profiled; summarising", flush=True)
    text = summary(args, profiler)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
