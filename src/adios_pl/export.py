"""Export the trained encoder as a plain ``state_dict`` that loads without adios_pl."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.errors import ConfigurationError

ENCODER_PREFIX = "encoder."


def encoder_state_dict(checkpoint: str | Path) -> dict[str, Tensor]:
    """The encoder's weights from a Lightning checkpoint of :class:`~adios_pl.ADIOSModule`.

    The checkpoint is read with ``torch.load(weights_only=True)``: data, not code. A missing,
    empty or truncated file, a folder, or a file without encoder weights is a one-line
    :class:`~adios_pl.errors.ConfigurationError` (``FileNotFoundError`` for a missing one).
    """
    state = AtomicCheckpointIO().load_checkpoint(checkpoint)  # onto the CPU
    weights = state.get("state_dict", state)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ConfigurationError(f"{checkpoint} holds no '{ENCODER_PREFIX}*' weights; is it an ADIOSModule checkpoint?")
    return encoder


def export_encoder(checkpoint: str | Path, path: str | Path) -> Path:
    """Write the encoder's ``state_dict`` from ``checkpoint`` to ``path`` (``torch.save``).

    For a registered ResNet the keys are torchvision's without ``fc`` (the classifier is
    replaced by the features): ``model = torchvision.models.resnet18(); model.fc =
    torch.nn.Identity()``, for images of <= 64 px also ``model.conv1 = nn.Conv2d(3, 64, 3, 1, 1,
    bias=False); model.maxpool = nn.Identity()`` (see ``examples/load_exported_encoder.py``), then
    ``model.load_state_dict(torch.load(path))``. For ``vit_tiny`` they load into
    ``timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=..., patch_size=...)``.
    """
    path = Path(path)
    if path.exists() and path.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"path={str(path)!r} is the checkpoint itself; choose another file for the exported encoder")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder_state_dict(checkpoint), path)
    return path
