"""Checkpoint I/O that never leaves a truncated file and loads checkpoints as data, not code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, ``fsync`` it, then ``os.replace`` it.

    A process killed while saving leaves the previous checkpoint (e.g. ``last.ckpt``) intact.
    Loading uses ``torch.load(weights_only=True)`` unless told otherwise: a checkpoint is data,
    not code. :class:`~adios_pl.ADIOSModule` installs this in place of Lightning's default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` by default."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
