"""Profile training steps of the real Trainer loop on a GPU: top kernels, GPU idle fraction and
host synchronisations per step, and where the step's time goes by phase.

Trains ResNet18 ADIOS (or a variant) on an image folder with OnlineKNN and OnlineLinearProbe;
after ``--warmup`` batches it profiles ``--steps`` batches with ``torch.profiler`` and, at the
same time, counts the host synchronisations that ``torch.cuda.set_sync_debug_mode`` reports,
with the Python line that caused each. The phases of a step (the device augmentation, the mask
generator's forward, each player's forward and backward, the optimiser steps, the end of the
batch, each callback) are marked with ``record_function``; each kernel is counted in the phase
during which the host launched it (the autograd engine's launches included), so the phase table
gives host time and GPU time side by side. A table of copies by the operation that asked for
each shows layout changes (channels-last to contiguous and back) and casts. Writes a Markdown
summary to ``--out``.

    python benchmarks/profile_step.py --data-dir /data/cifar10/train --augment-on device --out profile.md
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import time
import traceback
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.autograd import DeviceType
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


#: The methods marked as phases: (owner, method name, phase). A launch inside nested phases
#: counts in the innermost.
PHASES = (
    ("datamodule", "on_after_batch_transfer", "device augmentation"),
    ("model", "_predict_masks", "mask generator forward"),
    ("model", "_encoder_step", "encoder step: forward + backward"),
    ("model", "_mask_step", "mask step: forward + backward"),
    ("model", "_step_player", "optimiser steps (gradient checks, LARS)"),
    ("objective", "on_encoder_step_end", "momentum update"),
    ("model", "_end_batch", "end of batch (finiteness, schedulers, logs)"),
    ("knn", "on_train_batch_end", "OnlineKNN"),
    ("probe", "on_train_batch_end", "OnlineLinearProbe"),
)


def mark_phases(owners: dict[str, Any]) -> None:
    """Wrap each phase's method on its instance in a ``record_function`` range of the phase's name."""
    for owner, method, phase in PHASES:
        obj = owners[owner]
        original = getattr(obj, method)

        @functools.wraps(original)
        def marked(*args: Any, _original: Any = original, _phase: str = phase, **kwargs: Any) -> Any:
            with torch.profiler.record_function(f"phase: {_phase}"):
                return _original(*args, **kwargs)

        setattr(obj, method, marked)


def phase_table(events: Any, wall_us: float, busy_us: float, steps: int) -> list[str]:
    """Host time (the ranges' own length, inner phases subtracted) and GPU time (kernels launched
    during the range) per phase and step; what is outside every phase is "other"."""
    ranges = sorted(
        (e.time_range.start, e.time_range.end, e.name[len("phase: "):])
        for e in events if e.name.startswith("phase: ") and e.device_type == DeviceType.CPU  # not their GPU-side copies
    )
    host: dict[str, float] = collections.defaultdict(float)
    open_ranges: list[list[Any]] = []  # [end, name, length, time in inner ranges]; the ranges nest (one thread)

    def close() -> None:
        end, name, length, inner = open_ranges.pop()
        host[name] += length - inner

    for start, end, name in sorted(ranges, key=lambda r: (r[0], -r[1])):
        while open_ranges and open_ranges[-1][0] <= start:
            close()
        if open_ranges:
            open_ranges[-1][3] += end - start
        open_ranges.append([end, name, end - start, 0.0])
    while open_ranges:
        close()
    starts = [r[0] for r in ranges]
    gpu: collections.Counter[str] = collections.Counter()
    for e in events:
        kernels = sum(k.duration for k in e.kernels)
        if not kernels or e.name.startswith("phase: "):
            continue
        t, phase = e.time_range.start, "other (Lightning, transfers, the profiler)"
        for j in range(bisect.bisect_right(starts, t) - 1, -1, -1):  # the innermost range holding the launch
            if ranges[j][0] <= t <= ranges[j][1]:
                phase = ranges[j][2]
                break
        gpu[phase] += kernels
    host["other (Lightning, transfers, the profiler)"] += max(0.0, wall_us - sum(host.values()))
    lines = ["", "| phase | host ms per step | GPU ms per step |", "|---|---|---|"]
    for name in [p for _, _, p in PHASES] + ["other (Lightning, transfers, the profiler)"]:
        if host[name] or gpu[name]:
            lines.append(f"| {name} | {host[name] / 1e3 / steps:.2f} | {gpu[name] / 1e3 / steps:.2f} |")
    if busy_us:  # a kernel the profiler did not link to the operation that launched it is in no row
        lines.append(f"\n(GPU time in the rows: {sum(gpu.values()) / 1e3 / steps:.1f} of {busy_us / 1e3 / steps:.1f} ms per step)")
    return lines


def device_events(events: Any) -> list[Any]:
    """The GPU's own events: kernels, copies and memsets (not the GPU-side copies of
    ``record_function`` ranges). Each also appears, as a kernel, in the operation that launched
    it, so operations and these must not be added together."""
    return [
        e for e in events
        if e.device_type == DeviceType.CUDA and getattr(e, "activity_type", None) != "gpu_user_annotation" and not e.name.startswith("phase: ")
    ]


#: Operations that only pass a copy on: the row of a copy is the first ancestor not among them.
COPY_WRAPPERS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::empty_like"}


def copies_by_caller(events: Any) -> dict[str, tuple[int, float]]:
    """Every ``aten::copy_`` (a layout change, a cast, a join's staging) by the operation that
    asked for it, the first ancestor that is not a copy's wrapper (``contiguous``, ``clone``,
    ``to``): how many and their kernels' time in microseconds. Shows, for instance, whether
    ``native_group_norm`` turns channels-last input into contiguous memory on the GPU and back."""
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.name != "aten::copy_" or e.device_type != DeviceType.CPU or (CUDA and not e.kernels):
            continue  # (on a GPU, copies without a kernel: of host scalars)
        caller = e.cpu_parent
        while caller is not None and caller.name in COPY_WRAPPERS:
            caller = caller.cpu_parent
        row = table[caller.name if caller is not None else "(top level)"]
        row[0] += 1
        row[1] += sum(k.duration for k in e.kernels)
    return {name: (int(n), us) for name, (n, us) in table.items()}


def covered(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``intervals`` (kernels of several streams may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summary(args: argparse.Namespace, profiler: StepProfiler) -> str:
    events = profiler.prof.events()
    on_device = device_events(events)
    busy = covered([(e.time_range.start, e.time_range.end) for e in on_device])  # microseconds
    by_kernel: collections.Counter[str] = collections.Counter()
    for e in on_device:
        by_kernel[e.name] += e.time_range.elapsed_us()
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:  # the kernels each operation launched itself (not its children's)
        if e.device_type == DeviceType.CPU and e.kernels:
            by_op[e.name] += sum(k.duration for k in e.kernels)
    # the host's launch calls (compare with benchmarks/ops_per_step.py, counted on the CPU)
    launches = sum(1 for e in events if "LaunchKernel" in e.name or e.name in ("cudaMemcpyAsync", "cudaMemsetAsync"))
    steps, wall = args.steps, profiler.wall * 1e6
    lines = [
        f"## {args.variant}, augment_on={args.augment_on}"
        + (f", compile_augmentation={args.compile_augmentation!r}" if args.compile_augmentation else "")
        + (f", compile encoder and mask generator={args.compile!r}" if args.compile else "")
        + (f", compile_objective={args.compile_objective!r}" if args.compile_objective else "")
        + (f", compile_optimizers={args.compile_optimizers!r}" if args.compile_optimizers else "") + f", {args.label}".rstrip(", "),
        "",
        f"{torch.cuda.get_device_name() if CUDA else 'CPU'}, ResNet18, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
        f"N={args.num_masks}; {steps} steps after {args.warmup}, Trainer loop with data, OnlineKNN, OnlineLinearProbe.",
        "",
        f"- wall time per step: {wall / steps / 1e3:.1f} ms ({args.batch_size * steps / profiler.wall:.0f} images/s)",
        f"- GPU busy per step (time with a kernel, copy or memset running): {busy / steps / 1e3:.1f} ms; "
        f"idle fraction {max(0.0, 1 - busy / wall):.0%}" if CUDA else "- (no GPU: host times only)",
        f"- host synchronisations per step: {sum(profiler.syncs.values()) / steps:.1f}",
    ]
    for where, count in profiler.syncs.most_common(8):
        lines.append(f"  - {count / steps:.1f} per step at {where}")
    lines.append(f"- kernel launches (and asynchronous copies/memsets) per step: {launches / steps:.0f}")
    lines += phase_table(events, wall, sum(by_kernel.values()), steps)
    copies = copies_by_caller(events)
    lines += ["", "| copies (`aten::copy_`) asked for by | per step | GPU ms per step |", "|---|---|---|"]
    for name, (n, us) in sorted(copies.items(), key=lambda item: (-item[1][1], -item[1][0]))[:12]:
        lines.append(f"| `{name[:90]}` | {n / steps:.1f} | {us / 1e3 / steps:.2f} |")
    for title, table in (("kernel", by_kernel), ("operation (the kernels it launched)", by_op)):
        total = sum(table.values())
        lines += ["", f"| {title} | GPU ms per step | share |", "|---|---|---|"]
        for name, us in table.most_common(12):
            lines.append(f"| `{name[:90]}` | {us / 1e3 / steps:.2f} | {us / total:.0%} |")
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
    parser.add_argument("--compile-augmentation", nargs="?", const=True, default=False, metavar="MODE",
                        help="with --augment-on device: torch.compile the augmentation (in MODE if given)")
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the encoder and the mask generator (in MODE if given; reduce-overhead: CUDA "
                             "graphs); --warmup must cover the compiling and the graphs' recording")
    parser.add_argument("--compile-objective", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the objective's forward and losses (in MODE if given)")
    parser.add_argument("--compile-optimizers", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile both optimisers' updates (in MODE if given; never as CUDA graphs)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    place: dict[str, Any] = {"augment_on": args.augment_on} if args.augment_on != "host" else {}
    if args.compile_augmentation:
        place["compile_augmentation"] = args.compile_augmentation
    datamodule = ImageFolderDataModule(train_dir=args.data_dir, image_size=args.image_size, batch_size=args.batch_size,
                                       num_workers=args.num_workers, **place)
    settings: dict[str, Any] = {"num_masks": args.num_masks, **VARIANTS[args.variant]}
    if args.compile_objective:  # older versions lack the argument
        settings["compile_objective"] = args.compile_objective
    if args.compile_optimizers:  # older versions lack the argument
        settings["compile_optimizers"] = args.compile_optimizers
    model = ADIOSModule(encoder="resnet18", image_size=args.image_size, warmup_epochs=0, compile_encoder=args.compile,
                        compile_mask_generator=args.compile, **settings)
    profiler = StepProfiler(args.warmup, args.steps)
    knn, probe = OnlineKNN(), OnlineLinearProbe(num_classes=10)
    mark_phases({"datamodule": datamodule, "model": model, "objective": model.objective, "knn": knn, "probe": probe})
    trainer = pl.Trainer(
        accelerator="gpu" if CUDA else "cpu", devices=1, precision=args.precision, max_steps=args.warmup + args.steps + 1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, benchmark=True,
        callbacks=[knn, probe, profiler], num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    print("profiled; summarising", flush=True)
    text = summary(args, profiler)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
