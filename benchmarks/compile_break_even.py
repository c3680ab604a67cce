"""When does compiling pay for itself? From ``train_speed_gpu.json``: for each compiled run, the
eager run of the same variant and setting on the same card and code version, the time the
compiled run spent beyond steady training (compiling, recording CUDA graphs, start-up) against
the eager run's, and the number of training images after which the compiled run has caught up.

A run of ``E`` epochs of ``I`` images each at a steady ``r`` images/s took ``run_seconds``; its
start-up is what is left: ``run_seconds - E * I / r``. A compiled run (start-up ``s_c``, rate
``r_c``) catches up with the eager one (``s_e``, ``r_e``) after ``(s_c - s_e) / (1/r_e - 1/r_c)``
images. Rows written before ``train_speed.py`` recorded its ``batches`` and ``epochs`` take the
values ``gpu_train_speed.sh`` runs with (40 batches and 3 epochs at 32 px, 20 and 2 at 96 px).

    python benchmarks/compile_break_even.py [--results benchmarks/results/train_speed_gpu.json] [--run-images N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "train_speed_gpu.json"
#: Batches per epoch and epochs of gpu_train_speed.sh's runs, by image size (rows without their own).
SCRIPT_RUNS = {32: (40, 3), 96: (20, 2)}
#: The settings a compiled run and its eager partner share.
SAME = ("variant", "augment_on", "device", "image_size", "batch_size", "precision", "num_masks", "per_view_bn")


#: Dataset sizes the break-even is also given in epochs of: quality.py's CIFAR-10 split, all of CIFAR-10.
EPOCH_IMAGES = (40_000, 50_000)


def startup_seconds(row: dict[str, Any]) -> float:
    """The run's seconds beyond its training images at its steady rate."""
    batches, epochs = row.get("batches"), row.get("epochs")
    if batches is None or epochs is None:
        batches, epochs = SCRIPT_RUNS[row["image_size"]]
    images = batches * row["batch_size"] * epochs
    return row["run_seconds"] - images / row["images_per_s"]


def version(row: dict[str, Any]) -> str:
    """The code version of a row: its label up to the first comma (labels add notes after it)."""
    return row.get("label", "").split(",")[0].strip()


def pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(eager, compiled) rows of the same setting, card and code version."""
    eager = [r for r in rows if not r.get("compile") and not r.get("compile_augmentation")]
    found = []
    for compiled in rows:
        if not compiled.get("compile"):
            continue
        partners = [e for e in eager if all(e.get(k) == compiled.get(k) for k in SAME) and version(e) == version(compiled)]
        if partners:
            found.append((partners[-1], compiled))
    return found


def seconds_saved_per_image(eager: dict[str, Any], compiled: dict[str, Any]) -> float:
    """Training seconds per image the compiled run saves at its steady rate."""
    return 1 / eager["images_per_s"] - 1 / compiled["images_per_s"]


def format_table(rows: list[dict[str, Any]], epoch_images: tuple[int, ...] = EPOCH_IMAGES) -> str:
    """A markdown table of the break-even of every compiled run in ``rows`` that has an eager partner;
    ``epoch_images``: dataset sizes to give it in epochs of."""
    found = pairs(rows)
    if not found:
        return "_no compiled run with an eager partner yet_"
    lines = ["| variant | card, version | eager: images/s, start-up s | compiled: images/s, start-up s | break-even images | "
             + " | ".join(f"epochs of {n:,}" for n in epoch_images) + " |", "|---|---|---|---|---|" + "---|" * len(epoch_images)]
    for eager, compiled in found:
        s_e, s_c = startup_seconds(eager), startup_seconds(compiled)
        gain = seconds_saved_per_image(eager, compiled)
        images = (s_c - s_e) / gain if gain > 0 else float("inf")
        lines.append(f"| {compiled['variant']} | {compiled['device']}, {compiled.get('label', '')} | {eager['images_per_s']:,.0f}, {s_e:.1f} | "
                     f"{compiled['images_per_s']:,.0f}, {s_c:.1f} | {images:,.0f} | " + " | ".join(f"{images / n:.1f}" for n in epoch_images) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--epoch-images", type=int, nargs="+", default=list(EPOCH_IMAGES),
                        help="dataset sizes to give the break-even in epochs of (default: quality.py's CIFAR-10 split, all of CIFAR-10)")
    parser.add_argument("--run-images", type=int, default=None,
                        help="also say what compiling would cost and save in a run of this many training images")
    args = parser.parse_args()
    rows = json.loads(args.results.read_text())
    print(format_table(rows, tuple(args.epoch_images)))
    if args.run_images:
        for eager, compiled in pairs(rows):
            more = startup_seconds(compiled) - startup_seconds(eager)
            saved = args.run_images * seconds_saved_per_image(eager, compiled)
            print(f"{compiled['variant']}, {args.run_images:,} images: start-up {more:.0f} s longer, training {saved:.0f} s shorter")


if __name__ == "__main__":
    main()
