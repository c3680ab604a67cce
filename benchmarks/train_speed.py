"""End-to-end training speed: the real Trainer loop with data, OnlineKNN and OnlineLinearProbe.

For each variant (``baseline``: num_masks=0; ``adios``: N masks, exact; ``adios_s``: one slot
per image; ``simultaneous``: ADIOS under ``update="simultaneous"``; ``*_batched``: the same with
``masked_views="batched"``) and each place of the augmentation (``host``: loader workers;
``device``: batched on the training device), one run trains ResNet18 on an image folder for ``--epochs`` epochs of ``--batches`` batches. Reported:
training images/s over the epochs after the first (from the first batch's start to the last
batch's end, the device synchronised at both ends; validation excluded), with the device name,
image size, batch, precision and the setting, appended to ``--out`` (JSON, one entry per run).

    python benchmarks/train_speed.py --data-dir /data/cifar10/train --accelerator gpu \\
        --precision bf16-mixed --variants baseline adios adios_s simultaneous --augment-on host device
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch._dynamo.utils import counters

from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineKNN, OnlineLinearProbe
from adios_pl.data import ImageFolderDataModule

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": dict(num_masks=0),
    "adios": dict(mask_mode="all"),
    "adios_s": dict(mask_mode="one"),
    "simultaneous": dict(mask_mode="all", update="simultaneous"),
    "baseline_batched": dict(num_masks=0, masked_views="batched"),
    "adios_batched": dict(mask_mode="all", masked_views="batched"),
    "adios_s_batched": dict(mask_mode="one", masked_views="batched"),
    "simultaneous_batched": dict(mask_mode="all", update="simultaneous", masked_views="batched"),
}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch's batches (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []
        self._start = 0.0
        self._batches = 0

    @staticmethod
    def _sync(module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._sync(module)
            self._start, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(module)
            self.epochs.append((self._batches, time.perf_counter() - self._start))


def run(args: argparse.Namespace, variant: str, augment_on: str, data: dict[str, ImageFolderDataModule]) -> dict[str, Any]:
    pl.seed_everything(0, workers=True)
    if args.compile or args.compile_augmentation or args.compile_objective or args.compile_optimizers:  # each run compiles its own, as a user's script would (and the
        torch._dynamo.reset()  # variants' encoder graphs together would pass dynamo's recompilation limit)
    if args.per_view_bn != "function":  # the switch exists from the version that has it on
        import adios_pl.batched_views as batched_views

        batched_views.PER_VIEW_FUNCTION = False
    if augment_on not in data:  # one DataModule per place, so the device path's decoded cache is reused
        place: dict[str, Any] = {"augment_on": augment_on} if augment_on != "host" else {}  # older versions lack the argument
        if args.compile_augmentation:
            place["compile_augmentation"] = args.compile_augmentation
        data[augment_on] = ImageFolderDataModule(
            train_dir=args.data_dir, val_fraction=args.val_fraction, image_size=args.image_size, batch_size=args.batch_size,
            num_workers=args.num_workers, **place,
        )
    datamodule = data[augment_on]
    datamodule.setup("fit")
    settings: dict[str, Any] = {"num_masks": args.num_masks, **VARIANTS[variant]}
    if args.compile_objective:  # older versions lack the argument
        settings["compile_objective"] = args.compile_objective
    if args.compile_optimizers:  # older versions lack the argument
        settings["compile_optimizers"] = args.compile_optimizers
    model = ADIOSModule(
        encoder="resnet18", image_size=args.image_size, mask_width=args.mask_width, lr=0.3, mask_lr=0.1,
        warmup_epochs=0, compile_encoder=args.compile, compile_mask_generator=args.compile, **settings,
    )
    timer = EpochTimer()
    callbacks = [OnlineKNN(k=20), OnlineLinearProbe(num_classes=datamodule.num_classes or 2), timer]
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=args.epochs,
        limit_train_batches=args.batches, limit_val_batches=args.val_batches, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, benchmark=True,
    )
    if args.accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    counters.clear()  # the compiler's counts of this run only
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    later = timer.epochs[1:] or timer.epochs
    images = sum(b for b, _ in later) * args.batch_size
    seconds = sum(s for _, s in later)
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor() or platform.machine()
    return {
        "variant": variant, "augment_on": augment_on, "device": device, "image_size": args.image_size,
        "batch_size": args.batch_size, "precision": args.precision, "num_masks": settings["num_masks"],
        "compile": args.compile, "compile_augmentation": args.compile_augmentation, "compile_objective": args.compile_objective,
        "compile_optimizers": args.compile_optimizers, "per_view_bn": args.per_view_bn, "num_workers": args.num_workers, "batches": timer.epochs[0][0], "epochs": len(timer.epochs), "epochs_measured": len(later),
        "images_per_s": round(images / seconds, 1), "first_epoch_images_per_s": round(timer.epochs[0][0] * args.batch_size / timer.epochs[0][1], 1),
        "run_seconds": round(time.perf_counter() - start, 1), "data": os.path.basename(os.path.dirname(os.path.abspath(args.data_dir))),
        "torch": torch.__version__, "lightning": pl.__version__, "label": args.label,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if args.accelerator == "gpu" else None,
        **(compiler_counts() if args.compile or args.compile_augmentation or args.compile_objective or args.compile_optimizers else {}),
    }


def append_entries(path: str, entries: list[dict[str, Any]]) -> None:
    """Add ``entries`` to the JSON list in ``path`` (created if missing)."""
    existing = json.load(open(path)) if os.path.exists(path) else []
    with open(path, "w") as f:
        json.dump(existing + entries, f, indent=1)


def compiler_counts() -> dict[str, int]:
    """What the compiler did in the run: graphs compiled, graph breaks, and compiled graphs that
    were not replayed as CUDA graphs in a CUDA-graph mode (0 when every compiled graph replays;
    ``TORCH_LOGS=cudagraphs`` prints why one does not); and how many of the graphs' generated
    code Inductor found in its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) or had to generate.
    Without them a compiled run's speed cannot be read."""
    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "inductor_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
        "inductor_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_cache_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_cache_misses": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="image folder (class folders)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--augment-on", nargs="+", choices=["host", "device"], default=["device"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--mask-width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--num-workers", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60, help="training batches per epoch")
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches per loader (kNN, probe)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the encoder and a learned mask generator, in MODE if given "
                             "(e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--compile-augmentation", nargs="?", const=True, default=False, metavar="MODE",
                        help="with --augment-on device: torch.compile the augmentation's image operations, in MODE if "
                             "given (the DataModule's compile_augmentation)")
    parser.add_argument("--compile-objective", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the objective's forward (the encoder within it) and losses, in MODE if given "
                             "(ADIOSModule's compile_objective)")
    parser.add_argument("--compile-optimizers", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile both optimisers' updates, in MODE if given, never as CUDA graphs "
                             "(ADIOSModule's compile_optimizers)")
    parser.add_argument("--per-view-bn", choices=["function", "cat"], default="function",
                        help="batched views: plain batch norm through the per-view function (default), or its own "
                             "forward per view joined by cat (adios_pl.batched_views.PER_VIEW_FUNCTION)")
    parser.add_argument("--label", default="", help="a note stored with each entry (e.g. the code version)")
    parser.add_argument("--out", default=None, help="append each entry to this JSON list as its run ends")
    args = parser.parse_args()
    data: dict[str, ImageFolderDataModule] = {}
    for augment_on in args.augment_on:
        for variant in args.variants:
            entry = run(args, variant, augment_on, data)
            print(json.dumps(entry), flush=True)
            if args.out:  # after every run, so a run cut short by a time limit keeps what it finished
                append_entries(args.out, [entry])


if __name__ == "__main__":
    main()
