"""Two-view loader throughput (images/s) of a DataModule, to compare with the step's images/s.

    python benchmarks/data_speed.py --data shapes --workers 2
    python benchmarks/data_speed.py --data folder --data-dir /tmp/cifar10/train --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from adios_pl.data import ImageFolderDataModule, ShapesDataModule, SSLDataModule


def loader_speed(datamodule: SSLDataModule, batches: int) -> dict[str, Any]:
    """Images/s over ``batches`` training batches, after the first (worker start-up) one."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    it = iter(loader)
    (x1, x2), y = next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        (x1, x2), y = next(it)
        images += len(y)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "batches": batches, "batch_size": len(y), "view_shape": list(x1.shape[1:]),
            "min": float(torch.minimum(x1.min(), x2.min())), "max": float(torch.maximum(x1.max(), x2.max()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["shapes", "folder"], default="shapes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.data == "shapes":
        dm: SSLDataModule = ShapesDataModule(train_size=args.batch_size * (args.batches + 2), batch_size=args.batch_size, num_workers=args.workers, pin_memory=False)
    else:
        dm = ImageFolderDataModule(args.data_dir, val_fraction=0.0, image_size=32, batch_size=args.batch_size, num_workers=args.workers, pin_memory=False, blur_prob=0.0)
    result = {"command": "python benchmarks/data_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
              **loader_speed(dm, args.batches)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
