"""Use a trained ResNet encoder downstream without adios-pl: export it, then load it into torchvision.

    python examples/load_exported_encoder.py CHECKPOINT [--image-size 32] [--out encoder.pt]

``CHECKPOINT`` must come from a run with ``encoder: resnet18`` (for example a config in
``configs/``); the demo's checkpoint holds the small CNN, not a ResNet, and is refused with a
message. torchvision's ResNet18 takes the weights once shaped like adios-pl's: at 64 px or less
the stem is a 3x3 stride-1 convolution without max-pool, and ``fc`` is ``nn.Identity()`` (the
exported weights have no classifier). ``adios-pl export --ckpt_path CHECKPOINT`` writes the same
file from the command line.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

from adios_pl.export import encoder_state_dict, export_encoder


def plain_resnet18(image_size: int) -> torch.nn.Module:
    """torchvision's ResNet18 shaped like adios-pl's: CIFAR stem at <= 64 px, no classifier."""
    model = torchvision.models.resnet18()
    if image_size <= 64:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--image-size", type=int, default=32, help="the training image size (the stem depends on it)")
    parser.add_argument("--out", default=None, help="where to write the exported weights (default: a temporary file)")
    args = parser.parse_args()
    if "conv1.weight" not in encoder_state_dict(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} does not hold a ResNet encoder (no conv1.weight); train with encoder: resnet18")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "encoder_resnet18.pt"
    path = export_encoder(args.checkpoint, out)
    encoder = plain_resnet18(args.image_size)
    encoder.load_state_dict(torch.load(path, weights_only=True))
    encoder.eval()
    classifier = torch.nn.Sequential(encoder, torch.nn.Linear(512, 10))  # fine-tune this downstream
    print(f"weights: {path}; logits of two images: {tuple(classifier(torch.randn(2, 3, args.image_size, args.image_size)).shape)}")


if __name__ == "__main__":
    main()
