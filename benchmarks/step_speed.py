"""Step speed and peak memory: ADIOSModule's step against a plain re-implementation of the reference.

For each setting (N masks, ADIOS or ADIOS-s, SimCLR or BYOL) one Lightning run trains
ADIOSModule on a fixed batch; after every one of its steps a callback runs the reference step
(``benchmarks/reference_step.py``: clean view re-encoded per mask in both players, mask
generator run twice, the online classifier's extra forward of both views) on the same batch, so
the two alternate. Reported: median images/s over ``--reps`` repetitions of ``--steps`` steps
each, and the peak activation memory of a step: the largest total size of tensors held for
backward at any moment (counted with ``torch.autograd.graph.saved_tensors_hooks``, on any
device), and on CUDA also ``max_memory_allocated`` above what was allocated before the step.

    python benchmarks/step_speed.py --out results.json                      # CPU, small_cnn, 32 px
    python benchmarks/step_speed.py --device cuda --encoder resnet18 --image-size 96 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import weakref
from typing import Any, cast

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from adios_pl import ADIOSModule
from adios_pl.objectives import BYOL, SimCLR

from reference_step import reference_step  # benchmarks/reference_step.py


class FixedBatches(Dataset):
    """The same two-view batch, ``length`` times (collated by a batch_size=None loader)."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.batch


def build(args: argparse.Namespace, objective: str, num_masks: int, mode: str, update: str = "alternating") -> ADIOSModule:
    torch.manual_seed(0)
    obj = SimCLR() if objective == "simclr" else BYOL()
    kwargs = {"width": 16} if args.encoder == "small_cnn" else {}
    return ADIOSModule(
        encoder=args.encoder, encoder_kwargs=kwargs, objective=obj, num_masks=num_masks, mask_mode=cast(Any, mode), image_size=args.image_size,
        mask_width=args.mask_width, lr=1e-3, mask_lr=1e-3, warmup_epochs=0, update=cast(Any, update), channels_last=args.channels_last,
        **({"masked_views": args.masked_views} if args.masked_views != "sequential" else {}),  # older versions lack it
    )


def make_batch(args: argparse.Namespace, device: torch.device) -> Any:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = (torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device))
    return views, torch.zeros(args.batch_size, dtype=torch.long, device=device)


class Reference:
    """The reference step on a copy of the model, with its own optimisers."""

    def __init__(self, model: ADIOSModule) -> None:
        self.model = copy.deepcopy(model)
        m = self.model
        self.enc_opt = torch.optim.SGD([*m.encoder.parameters(), *m.objective.trainable_parameters()], lr=1e-3, momentum=0.9)
        self.mask_opt = torch.optim.SGD(m.mask_generator.parameters(), lr=1e-3, momentum=0.9) if m.mask_generator is not None else None
        self.slots_g = torch.Generator().manual_seed(1)

    def step(self, batch: Any, step: int) -> None:
        (x1, x2), _ = batch
        m = self.model
        slots = torch.randint(m.num_masks, (x1.shape[0],), generator=self.slots_g) if m.mask_mode == "one" else None
        reference_step(m.encoder, m.objective, m.mask_generator, x1, x2, self.enc_opt, self.mask_opt, m.num_masks,
                       m.sparsity_weight, m.entropy_weight, step, 10_000, slots=slots, probe_forward=True)


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward and still alive, while active. Each storage counts
    once, however many of its views are saved (per-view batch norm saves a slice of one input per
    view)."""

    def __init__(self) -> None:
        # [current, peak] and the saved views alive per storage; the finalizers hold only these,
        # never the meter (or the models reachable from its owner), so nothing stays alive through them.
        self.counts = [0, 0]
        self.storages: dict[int, list[int]] = {}  # replaced, not cleared, at each start: see _release
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def peak(self) -> int:
        return self.counts[1]

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self.storages.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.counts[0] += entry[1]
            self.counts[1] = max(self.counts[1], self.counts[0])
        entry[0] += 1
        holder = _Held(tensor.detach())  # detached: an output saved by its own node would otherwise form a cycle through autograd that gc cannot see
        weakref.finalize(holder, _release, self.counts, self.storages, key)
        return holder

    @staticmethod
    def _unpack(holder: Any) -> torch.Tensor:
        return holder.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self.counts = [0, 0]  # new objects: tensors saved in an earlier measurement release into the old ones
        self.storages = {}
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _release(counts: list[int], storages: dict[int, list[int]], key: int) -> None:
    entry = storages[key]
    entry[0] -= 1
    if entry[0] == 0:
        counts[0] -= entry[1]
        del storages[key]


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Alternate(pl.Callback):
    """Times each ADIOSModule step, then a reference step on the same batch."""

    def __init__(self, reference: Reference | None, device: torch.device) -> None:
        self.reference, self.device = reference, device
        self.fast: list[float] = []
        self.slow: list[float] = []
        self.fast_mem: list[int] = []
        self.slow_mem: list[int] = []
        self.fast_saved: list[int] = []
        self.slow_saved: list[int] = []
        self.meter = SavedTensorMeter()
        self._t = 0.0
        self._base = 0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        self.meter.__enter__()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        _sync(self.device)
        self.fast.append(time.perf_counter() - self._t)
        self.meter.__exit__(None, None, None)
        self.fast_saved.append(self.meter.peak)
        if self.device.type == "cuda":
            self.fast_mem.append(torch.cuda.max_memory_allocated() - self._base)
        if self.reference is None:
            return
        with torch.enable_grad():
            _sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            with self.meter:
                self.reference.step(batch, batch_idx)
            _sync(self.device)
            self.slow.append(time.perf_counter() - t)
            self.slow_saved.append(self.meter.peak)
            if self.device.type == "cuda":
                self.slow_mem.append(torch.cuda.max_memory_allocated() - base)


def run_setting(args: argparse.Namespace, objective: str, num_masks: int, mode: str, update: str, with_reference: bool) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build(args, objective, num_masks, mode, update)
    batch = make_batch(args, device)
    reference = Reference(model.to(device)) if with_reference else None
    warmup = 2
    timer = Alternate(reference, device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=warmup + args.reps * args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        precision=args.precision,
    )
    loader = DataLoader(FixedBatches(batch, warmup + args.reps * args.steps), batch_size=None)
    trainer.fit(model, loader)
    del trainer, model, reference, loader, batch  # free this setting's memory before the next
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def per_rep(times: list[float]) -> list[float]:
        times = times[warmup:]
        return [args.batch_size * args.steps / sum(times[i * args.steps : (i + 1) * args.steps]) for i in range(args.reps)]

    row: dict[str, Any] = {"objective": objective, "num_masks": num_masks, "mode": mode, "update": update,
                           "fast_images_per_s": statistics.median(per_rep(timer.fast))}
    if with_reference:
        row["reference_images_per_s"] = statistics.median(per_rep(timer.slow))
        row["speedup"] = row["fast_images_per_s"] / row["reference_images_per_s"]
    row["fast_saved_mib"] = max(timer.fast_saved[warmup:]) / 2**20
    if with_reference:
        row["reference_saved_mib"] = max(timer.slow_saved[warmup:]) / 2**20
        row["memory_ratio"] = row["fast_saved_mib"] / row["reference_saved_mib"]
    if device.type == "cuda":
        row["fast_peak_mib"] = max(timer.fast_mem[warmup:]) / 2**20
        if with_reference:
            row["reference_peak_mib"] = max(timer.slow_mem[warmup:]) / 2**20
            row["allocated_ratio"] = row["fast_peak_mib"] / row["reference_peak_mib"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-width", type=int, default=16)
    parser.add_argument("--masks", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--modes", nargs="+", default=["all", "one"])
    parser.add_argument("--objectives", nargs="+", default=["simclr", "byol"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--masked-views", default="sequential", choices=["sequential", "batched"])
    parser.add_argument("--simultaneous", action="store_true", help="also time update='simultaneous' (no reference rerun)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    rows = []
    for objective in args.objectives:
        for n in args.masks:
            for mode in args.modes:
                row = run_setting(args, objective, n, mode, "alternating", with_reference=True)
                if args.simultaneous and mode == "all":
                    row["simultaneous_images_per_s"] = run_setting(args, objective, n, mode, "simultaneous", False)["fast_images_per_s"]
                    row["simultaneous_speedup"] = row["simultaneous_images_per_s"] / row["reference_images_per_s"]
                rows.append(row)
                print(format_row(row), flush=True)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {"command": " ".join(sys.argv), "machine": machine, "torch": torch.__version__, "settings": vars(args), "rows": rows}
    print("\n" + format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def format_row(r: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the rows."""
    rows = result["rows"]
    sim = any("simultaneous_images_per_s" in r for r in rows)
    cuda = any("fast_peak_mib" in r for r in rows)
    head = ("| objective | N | mode | reference img/s | adios-pl img/s | speed-up | ref. activations MiB | adios-pl activations MiB | ratio |"
            + (" ref. / adios-pl max allocated MiB |" if cuda else "") + (" simultaneous img/s (×ref) |" if sim else ""))
    lines = [f"{result['machine']}, torch {result['torch']}: `{result['command']}`", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['objective']} | {r['num_masks']} | {'ADIOS' if r['mode'] == 'all' else 'ADIOS-s'} | {r['reference_images_per_s']:.0f} | "
                f"{r['fast_images_per_s']:.0f} | {r['speedup']:.2f}× | {r['reference_saved_mib']:.0f} | "
                f"{r['fast_saved_mib']:.0f} | {r['memory_ratio']:.2f} |")
        if cuda:
            line += f" {r['reference_peak_mib']:.0f} / {r['fast_peak_mib']:.0f} |"
        if sim:
            line += f" {r['simultaneous_images_per_s']:.0f} ({r['simultaneous_speedup']:.2f}×) |" if "simultaneous_images_per_s" in r else " - |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
