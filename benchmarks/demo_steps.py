"""The demo's figures along one run at its peak learning rate: why the demo plans its batches.

Until 33264b9, ``adios-pl demo`` trained for its time budget with the schedule of a 1,000-epoch
run, so it stopped at whatever batch the budget ended on, at the peak learning rate. This trains
that run (the demo's model, data, seed and callbacks; ``max_epochs=1000`` and no time limit),
copies the model after each of the given numbers of batches, stops after the last, and scores
every copy as the demo scores its end (offline kNN and linear probe, mask FG-ARI). One JSON line
per copy is printed. The demo now lays its schedule over the batches its budget fits, and ends
annealed; ``adios-pl demo --max-steps N`` is that run for N batches.

    python benchmarks/demo_steps.py --steps 150 156 160 164 168 172 --out benchmarks/results/demo_steps_cpu.json

Since the host augmentation draws each image's views from (seed, epoch, place in the epoch), a
copy after N batches is the model such a demo, stopped by its budget after N batches, trained.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

import adios_pl
from adios_pl.callbacks import MaskQuality, OnlineKNN, OnlineLinearProbe
from adios_pl.demo import demo_parts, measure


class CopyAfter(pl.Callback):
    """Keeps a CPU copy of the module after each batch count in ``steps``; stops after the last."""

    def __init__(self, steps: list[int]) -> None:
        self.steps, self.batches, self.copies = sorted(steps), 0, {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.batches += 1
        if self.batches in self.steps:
            self.copies[self.batches] = copy.deepcopy(module).cpu()
        if self.batches >= self.steps[-1]:
            trainer.should_stop = True


def main() -> None:
    """Train, copy, score, print (and write ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="batch counts to score the model at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the rows, the command's settings and the revision here")
    args = parser.parse_args()
    model, data = demo_parts(seed=args.seed)
    data.setup("fit")
    copies = CopyAfter(args.steps)
    trainer = pl.Trainer(  # the demo's Trainer before 33264b9, without its time limit, logger and pictures
        accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
        callbacks=[OnlineLinearProbe(num_classes=4), OnlineKNN(k=200, temperature=0.07), MaskQuality(), copies],
        log_every_n_steps=10, num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(model, data)
    rows = []
    for steps, trained in sorted(copies.copies.items()):
        rows.append({"steps": steps, **{key: round(value, 4) for key, value in measure(trained, data).items()}})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        source = Path(adios_pl.__file__).resolve().parent
        revision = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=source, capture_output=True, text=True).stdout.strip()
        Path(args.out).write_text(json.dumps({"revision": revision, "seed": args.seed, "machine": platform.machine(),
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
