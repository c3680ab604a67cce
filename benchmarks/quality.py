"""Does ADIOS learn better features than its baselines? Same encoder, steps, batch and seeds for:
the base objective alone, + ADIOS, + ADIOS-s, + random patch masks, + random block masks.

Reports online linear top-1, kNN top-1 (k=200, T=0.07, fixed), offline linear probe top-1,
mask FG-ARI (data with segmentations), images/s and wall time, mean ± std over seeds. Writes
``benchmarks/results/quality_<data>.json`` (command, git revision, machine, per-run numbers) and
re-renders ``benchmarks/results/quality.md`` from every quality_*.json.

    python benchmarks/quality.py --data shapes --steps 200 --seeds 0 1 2
    python benchmarks/quality.py --data shapes --objective byol --steps 200 --seeds 0 1 2
    python benchmarks/quality.py --data folder --data-dir /tmp/cifar10/train --steps 400
    # on a GPU: ResNet18, as many steps as let every variant finish in 7 minutes
    python benchmarks/quality.py --data folder --data-dir /tmp/cifar10/train --encoder resnet18 \
        --accelerator gpu --precision bf16-mixed --batch-size 256 --num-workers 12 --minutes 7

Results go to ``quality_<data>[_<encoder>][_<objective>].json``, rewritten after every run, so an
interrupted benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchvision.utils import save_image

from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskQuality, OnlineKNN, OnlineLinearProbe, mask_grid
from adios_pl.data import ImageFolderDataModule, ShapesDataModule
from adios_pl.demo import BatchClock, TrainSpeed, demo_model, measure
from adios_pl.objectives import BYOL, Objective, SimCLR

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": dict(num_masks=0),
    "adios": dict(num_masks=4, mask_mode="all"),
    "adios_s": dict(num_masks=4, mask_mode="one"),
    "random_patch": dict(num_masks=4, mask_type="random_patch"),
    "random_block": dict(num_masks=4, mask_type="random_block"),
    "adios_simultaneous": dict(num_masks=4, mask_mode="all", update="simultaneous"),
}
#: The objectives, sized like the demo's SimCLR (small heads for CPU-sized encoders).
OBJECTIVES = {
    "simclr": lambda: SimCLR(temperature=0.2, proj_hidden_dim=512, proj_output_dim=128),
    "byol": lambda: BYOL(proj_hidden_dim=512, proj_output_dim=128, pred_hidden_dim=512),
}


def make_data(args: argparse.Namespace) -> Any:
    pin = args.accelerator != "cpu"
    place = {"augment_on": args.augment_on} if args.augment_on != "host" else {}
    if args.data == "shapes":
        return ShapesDataModule(train_size=8192, val_size=1024, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin,
                                **place)
    # CIFAR-10 style folder: hold out 1,000 images per class (10 %) for evaluation
    return ImageFolderDataModule(args.data_dir, val_fraction=0.2 if args.holdout is None else args.holdout, image_size=32,
                                 batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin, blur_prob=0.0,
                                 mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), **place)


def make_model(args: argparse.Namespace, variant: str) -> ADIOSModule:
    """The demo's settings with this encoder, objective and variant."""
    objective: Objective = OBJECTIVES[args.objective]()
    views = {"masked_views": args.masked_views} if args.masked_views != "sequential" else {}
    return demo_model(encoder=args.encoder, objective=objective, **views, **VARIANTS[variant])


def trainer_for(args: argparse.Namespace, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet single-device trainer on ``args.accelerator`` at ``args.precision``."""
    return pl.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def calibrate(args: argparse.Namespace, seconds: float, probe_steps: int = 25) -> int:
    """Steps per run such that every (variant, seed) run, evaluation included, fits in ``seconds``.

    Times ``probe_steps`` steps of each variant (data-loading waits included) and keeps
    ``args.eval_reserve`` seconds per run for start-up, evaluation and the mask picture.
    """
    started = time.perf_counter()
    per_step = 0.0
    for variant in args.variants:
        pl.seed_everything(0, verbose=False)
        clock = BatchClock()
        trainer_for(args, [clock], max_steps=probe_steps, limit_val_batches=0).fit(make_model(args, variant), make_data(args))
        seconds_per_step = statistics.mean(clock.train[4:])  # data-loading waits included; the first 5 steps left out
        print(f"calibration: {variant} {seconds_per_step:.3f} s/step", flush=True)
        per_step += seconds_per_step
    left = seconds - (time.perf_counter() - started) - args.eval_reserve * len(args.variants) * len(args.seeds)
    steps = int(left / (per_step * len(args.seeds)))
    if steps < 1:
        raise SystemExit(f"--minutes {args.minutes} leaves no time to train after calibration ({per_step:.2f} s per step of all variants)")
    print(f"calibration: {steps} steps per run fit in {args.minutes} min", flush=True)
    return steps


def run(args: argparse.Namespace, variant: str, seed: int, revision: str) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    data = make_data(args)
    data.setup("fit")
    model = make_model(args, variant)
    speed = TrainSpeed()
    callbacks: list[pl.Callback] = [OnlineLinearProbe(num_classes=int(data.num_classes)), OnlineKNN(), speed]
    if args.data == "shapes":
        callbacks.append(MaskQuality())
    started = time.perf_counter()
    trainer_for(args, callbacks, max_steps=args.steps, limit_val_batches=0).fit(model, data)
    train_seconds = time.perf_counter() - started
    trainer = trainer_for(args, callbacks)
    trainer.validate(model, data, verbose=False)
    online = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    validate_seconds = time.perf_counter() - started - train_seconds
    if args.accelerator == "gpu":  # Lightning's teardown leaves the model on the CPU
        model.cuda()
    offline = measure(model, data, probe_epochs=30)
    measure_seconds = time.perf_counter() - started - train_seconds - validate_seconds
    if model.mask_generator is not None and seed == args.seeds[0]:
        save_mask_picture(model, data, args.results / f"masks_{result_name(args)}_{variant}.png")
    epochs = args.steps * args.batch_size / len(data.pretrain_set)
    row = {"variant": variant, "seed": seed, "git_revision": revision, "steps": args.steps, "epochs": epochs, "images_per_s": speed.images_per_second,
           "train_seconds": train_seconds, "validate_seconds": validate_seconds, "offline_eval_seconds": measure_seconds, "online_linear_top1": online.get("val/linear_top1"), "knn_top1": online.get("val/knn_top1"),
           "offline_linear_top1": offline["linear_top1"], "offline_knn_top1": offline["knn_top1"],
           "mask_fg_ari": offline.get("mask_fg_ari"), "random_patch_fg_ari": offline.get("random_patch_fg_ari")}
    print(json.dumps(row), flush=True)
    return row


def data_name(args: argparse.Namespace) -> str:
    return "shapes" if args.data == "shapes" else Path(args.data_dir).resolve().parent.name or "folder"


def result_name(args: argparse.Namespace) -> str:
    """``<data>[_<encoder>][_<objective>][_<tag>]``, the defaults (small_cnn, simclr) left out."""
    parts = [data_name(args)] + [x for x, default in ((args.encoder, "small_cnn"), (args.objective, "simclr")) if x != default]
    return "_".join(parts + ([args.tag] if args.tag else []))


@torch.no_grad()
def save_mask_picture(model: ADIOSModule, data: Any, path: Path, rows: int = 4) -> None:
    """The masks of the first evaluation images (see MaskVisualizer for the layout)."""
    images = next(iter(data.val_dataloader()[0]))[0][:rows]
    assert model.mask_generator is not None, "only variants with masks have a mask picture"
    model.eval()
    masks = model.mask_generator(images.to(model.device)).float().cpu()
    grid = mask_grid(images, masks, data.mean, data.std, scale=2)
    model.train()
    save_image(grid, path)


def git_revision() -> str:
    """$GIT_REVISION if set (a copy of the tree whose .git is not its own), else ``git rev-parse HEAD``."""
    if os.environ.get("GIT_REVISION"):
        return os.environ["GIT_REVISION"]
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS).stdout.strip()
    except OSError:
        found = ""
    return found or "unknown"


def render(results: Path = RESULTS) -> str:
    """Markdown tables (mean ± std over seeds) from every quality_*.json in ``results``."""
    out = []
    for path in sorted(results.glob("quality_*.json")):
        result = json.loads(path.read_text())
        title = result.get("title", result["data"])
        out.append(f"**{title}** — {result['machine']}, last run at revision {result['git_revision'][:10]}: `{result['command']}`\n")
        out.append("| variant | seeds | steps (epochs) | offline linear top-1 | kNN top-1 | online linear top-1 | mask FG-ARI | images/s | train min |")
        out.append("|---|---|---|---|---|---|---|---|---|")
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

            steps = sorted({r["steps"] for r in rows})
            epochs = sorted({round(r["epochs"], 1) for r in rows if "epochs" in r})
            length = "/".join(map(str, steps)) + (f" ({'/'.join(f'{e:g}' for e in epochs)})" if epochs else "")
            out.append(f"| {variant} | {len(rows)} | {length} | {cell('offline_linear_top1')} | {cell('knn_top1')} | {cell('online_linear_top1')} | "
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
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="simclr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=None, help="instead of --steps: the most steps that let every run finish in this time (0: use --steps)")
    parser.add_argument("--eval-reserve", type=float, default=30.0, help="seconds kept per run for start-up and evaluation (with --minutes)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--augment-on", choices=["host", "device"], default="host", help="where the two views are made")
    parser.add_argument("--masked-views", choices=["sequential", "batched"], default="sequential",
                        help="ADIOSModule(masked_views=...): the same training, fewer kernel launches with batched")
    parser.add_argument("--tag", default="", help="added to the result file's name (e.g. long, for runs with other --steps)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON, the tables and the mask pictures")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--append", action="store_true", help="add these runs to the existing result file (same variant and seed replaced)")
    args = parser.parse_args()
    if args.data == "folder" and not args.data_dir:
        parser.error("--data folder needs --data-dir (a class-folder tree of images)")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.accelerator != "cpu":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        started = time.perf_counter()
        if args.minutes:  # 0 or unset: --steps
            args.steps = calibrate(args, args.minutes * 60)
        path = args.results / f"quality_{result_name(args)}.json"
        revision = git_revision()
        machine = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
        command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
        kept: list[dict[str, Any]] = []
        if args.append and path.exists():
            old = json.loads(path.read_text())
            new = {(v, seed) for seed in args.seeds for v in args.variants}
            kept = [r for r in old["runs"] if (r["variant"], r["seed"]) not in new]
            command = old["command"] + "; then " + command
        title = ", ".join([data_name(args), args.encoder, args.objective] + ([args.tag] if args.tag else []))
        result: dict[str, Any] = {"data": data_name(args), "title": title, "command": command, "git_revision": revision, "machine": machine, "runs": kept}
        for seed in args.seeds:
            for variant in args.variants:
                result["runs"].append(run(args, variant, seed, revision))
                result["wall_seconds"] = time.perf_counter() - started
                path.write_text(json.dumps(result, indent=2))  # after every run: an interrupted benchmark keeps its runs
    (args.results / "quality.md").write_text(render(args.results))
    print(render(args.results))


if __name__ == "__main__":
    main()
