"""Offline evaluation of a trained run: a linear probe and kNN on the frozen encoder.

    python examples/evaluate_checkpoint.py CHECKPOINT --train-dir DIR [--val-dir DIR] [--epochs 100] [--augment] [--device cpu]

``CHECKPOINT`` is a checkpoint of ``adios-pl fit`` (``ADIOSModule.load_from_checkpoint`` rebuilds
it from its own hyper-parameters; one written by a script needs its modules passed again, see
the README). The labelled images are class folders: ``--train-dir`` fits the probe and the kNN
bank, ``--val-dir`` is scored (without it, a held-out tenth of ``--train-dir``). The settings are
fixed, not chosen on the scored split: SGD 0.1, momentum 0.9, batch 128, lr x0.1 at 60 % and
80 % of the epochs; kNN k=200, T=0.07. ``--augment`` trains the probe on fresh crops and flips
each epoch with LARS, the reference's protocol (slower). Images are normalised with ImageNet's
statistics, the folder default; pass ``--mean``/``--std`` if the run used others (CIFAR's, say).

The same from the command line, on any DataModule and with the run's own data settings:
``adios-pl evaluate --config <log dir>/config.yaml --ckpt_path CHECKPOINT``.
"""

from __future__ import annotations

import argparse
import json

from adios_pl import ADIOSModule
from adios_pl.data import ImageFolderDataModule
from adios_pl.evaluation import evaluate_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train-dir", required=True, help="labelled training images, one folder per class")
    parser.add_argument("--val-dir", default=None, help="labelled images to score (default: a held-out tenth of --train-dir)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--augment", action="store_true", help="train the probe on augmented images with LARS")
    parser.add_argument("--batch-size", type=int, default=128, help="of feature extraction")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU where there is one)")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="the training run's normalisation mean")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="the training run's normalisation std")
    args = parser.parse_args()

    model = ADIOSModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    data = ImageFolderDataModule(args.train_dir, val_dir=args.val_dir, image_size=model.image_size,
                                 batch_size=args.batch_size, num_workers=args.num_workers, mean=args.mean, std=args.std)
    result = evaluate_encoder(model.encoder, data, device=args.device, epochs=args.epochs, augment=args.augment,
                              optimizer="lars" if args.augment else "sgd")
    print(json.dumps({"checkpoint": args.checkpoint, "epochs": args.epochs, "augment": args.augment, **result}))


if __name__ == "__main__":
    main()
