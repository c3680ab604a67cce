"""Does ADIOS learn better features than its baselines? Same encoder, steps, batch and seeds for:
the base objective alone, + ADIOS, + ADIOS-s, + random patch masks, + random block masks.

Reports online linear top-1, kNN top-1 (k=200, T=0.07, fixed), offline linear probe top-1,
mask FG-ARI (data with segmentations), images/s and wall time, mean ± std over seeds. Writes
``benchmarks/results/quality_<data>.json`` (command, git revision, machine, per-run numbers) and
re-renders ``benchmarks/results/quality.md`` from every quality_*.json.

    python benchmarks/quality.py --data shapes --steps 200 --seeds 0 1 2
    python benchmarks/quality.py --data folder --data-dir /tmp/cifar10/train --steps 400
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from adios_pl import ADIOSModule
from torchvision.utils import save_image

from adios_pl.callbacks import MaskQuality, OnlineKNN, OnlineLinearProbe, mask_grid
from adios_pl.data import ImageFolderDataModule, ShapesDataModule
from adios_pl.demo import TrainSpeed, demo_model, measure

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "baseline": dict(num_masks=0),
    "adios": dict(num_masks=4, mask_mode="all"),
    "adios_s": dict(num_masks=4, mask_mode="one"),
    "random_patch": dict(num_masks=4, mask_type="random_patch"),
    "random_block": dict(num_masks=4, mask_type="random_block"),
    "adios_simultaneous": dict(num_masks=4, mask_mode="all", update="simultaneous"),
}


def make_data(args: argparse.Namespace) -> Any:
    if args.data == "shapes":
        return ShapesDataModule(train_size=8192, val_size=1024, batch_size=args.batch_size, num_workers=2, pin_memory=False)
    # CIFAR-10 style folder: hold out 1,000 images per class (10 %) for evaluation
    return ImageFolderDataModule(args.data_dir, val_fraction=0.2 if args.holdout is None else args.holdout, image_size=32,
                                 batch_size=args.batch_size, num_workers=2, pin_memory=False, blur_prob=0.0,
                                 mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def run(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    data = make_data(args)
    data.setup("fit")
    model = demo_model(encoder=args.encoder, **VARIANTS[variant])  # the demo's settings, per variant
    speed = TrainSpeed()
    callbacks: list[pl.Callback] = [OnlineLinearProbe(num_classes=int(data.num_classes)), OnlineKNN(), speed]
    if args.data == "shapes":
        callbacks.append(MaskQuality())
    started = time.perf_counter()
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - started
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.validate(model, data, verbose=False)
    online = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    offline = measure(model.cpu(), data, probe_epochs=30)
    if model.mask_generator is not None and seed == args.seeds[0]:
        save_mask_picture(model, data, RESULTS / f"masks_{data_name(args)}_{variant}.png")
    row = {"variant": variant, "seed": seed, "steps": args.steps, "images_per_s": speed.images_per_second,
           "train_seconds": train_seconds, "online_linear_top1": online.get("val/linear_top1"), "knn_top1": online.get("val/knn_top1"),
           "offline_linear_top1": offline["linear_top1"], "offline_knn_top1": offline["knn_top1"],
           "mask_fg_ari": offline.get("mask_fg_ari"), "random_patch_fg_ari": offline.get("random_patch_fg_ari")}
    print(json.dumps(row), flush=True)
    return row


def data_name(args: argparse.Namespace) -> str:
    return "shapes" if args.data == "shapes" else Path(args.data_dir).parent.name or "folder"


@torch.no_grad()
def save_mask_picture(model: ADIOSModule, data: Any, path: Path, rows: int = 4) -> None:
    """The masks of the first evaluation images (see MaskVisualizer for the layout)."""
    images = next(iter(data.val_dataloader()[0]))[0][:rows]
    model.eval()
    grid = mask_grid(images, model.mask_generator(images), data.mean, data.std, scale=2)
    model.train()
    save_image(grid, path)


def render() -> str:
    """Markdown tables (mean ± std over seeds) from every results/quality_*.json."""
    out = []
    for path in sorted(RESULTS.glob("quality_*.json")):
        result = json.loads(path.read_text())
        out.append(f"**{result['data']}** — {result['machine']}, revision {result['git_revision'][:10]}: `{result['command']}`\n")
        out.append("| variant | seeds | offline linear top-1 | kNN top-1 | online linear top-1 | mask FG-ARI | images/s | train min |")
        out.append("|---|---|---|---|---|---|---|---|")
        for variant in VARIANTS:
            rows = [r for r in result["runs"] if r["variant"] == variant]
            if not rows:
                continue

            def cell(key: str, digits: int = 3) -> str:
                values = [r[key] for r in rows if r.get(key) is not None]
                if not values:
                    return "-"
                mean = statistics.mean(values)
                return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

            out.append(f"| {variant} | {len(rows)} | {cell('offline_linear_top1')} | {cell('knn_top1')} | {cell('online_linear_top1')} | "
                       f"{cell('mask_fg_ari')} | {cell('images_per_s', 0)} | {statistics.mean(r['train_seconds'] for r in rows) / 60:.1f} |")
        fg = [r["random_patch_fg_ari"] for r in result["runs"] if r.get("random_patch_fg_ari") is not None]
        if fg:
            out.append(f"\nFG-ARI of random 8-px patch segmentations on the same images: {statistics.mean(fg):.3f}.")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["shapes", "folder"], default="shapes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--holdout", type=float, default=None, help="held-out fraction of --data-dir (default 0.2 = 1,000 per CIFAR-10 class)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--append", action="store_true", help="add these runs to the existing result file (same variant and seed replaced)")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    RESULTS.mkdir(exist_ok=True)
    if not args.render_only:
        runs = [run(args, variant, seed) for seed in args.seeds for variant in args.variants]
        name = data_name(args)
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
        machine = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
        command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
        path = RESULTS / f"quality_{name}.json"
        if args.append and path.exists():
            old = json.loads(path.read_text())
            keep = [r for r in old["runs"] if (r["variant"], r["seed"]) not in {(n["variant"], n["seed"]) for n in runs}]
            runs = keep + runs
            command = old["command"] + "; then " + command
        result = {"data": name, "command": command, "git_revision": revision, "machine": machine, "runs": runs}
        path.write_text(json.dumps(result, indent=2))
    (RESULTS / "quality.md").write_text(render())
    print(render())


if __name__ == "__main__":
    main()
