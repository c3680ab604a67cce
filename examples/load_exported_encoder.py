"""Use a trained encoder downstream without adios-pl: export, then load into torchvision.

    python examples/load_exported_encoder.py runs/demo/checkpoints/last.ckpt   # a resnet18 run
"""

from __future__ import annotations

import sys

import torch
import torchvision

from adios_pl.export import export_encoder


def plain_resnet18(image_size: int) -> torch.nn.Module:
    """torchvision's ResNet18 shaped like adios-pl's: CIFAR stem at <= 64 px, no classifier."""
    model = torchvision.models.resnet18()
    if image_size <= 64:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    return model


def main() -> None:
    checkpoint = sys.argv[1]
    path = export_encoder(checkpoint, "encoder_resnet18.pt")
    encoder = plain_resnet18(image_size=32)
    encoder.load_state_dict(torch.load(path, weights_only=True))
    encoder.eval()
    classifier = torch.nn.Sequential(encoder, torch.nn.Linear(512, 10))  # fine-tune this downstream
    print(classifier(torch.randn(2, 3, 32, 32)).shape)


if __name__ == "__main__":
    main()
