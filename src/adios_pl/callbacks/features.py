"""Write the encoder's features of a prediction run to disk (``adios-pl predict``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from adios_pl.backend import BasePredictionWriter, pl, rank_zero_info


class FeatureWriter(BasePredictionWriter):
    """Save ``{"features", "targets", "indices"}`` of each prediction loader as one file per rank.

    Files: ``<out_dir>/features_<loader>_rank<r>.pt`` (loader 0: the evaluation split, 1: the
    labelled training images, for the DataModules here); ``indices`` are dataset indices, so the
    ranks' files can be put back in order. ``out_dir=None`` writes under the trainer's
    ``default_root_dir``.

    Args:
        out_dir: Folder of the files.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = out_dir
        self.paths: list[Path] = []

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        """Concatenate each loader's batches and save them."""
        root = Path(self.out_dir or Path(trainer.default_root_dir) / "features")
        root.mkdir(parents=True, exist_ok=True)
        nested = bool(predictions) and isinstance(predictions[0], list)
        per_loader = predictions if nested else [predictions]
        per_indices = batch_indices if nested else [batch_indices]
        for loader, (outputs, indices) in enumerate(zip(per_loader, per_indices)):
            if not outputs:
                continue
            flat = [i for batch in indices for i in batch] if indices else []
            data = {
                "features": torch.cat([o["features"].cpu() for o in outputs]),
                "targets": torch.cat([o["targets"].cpu() for o in outputs]),
                "indices": torch.tensor(flat, dtype=torch.long),
            }
            path = root / f"features_{loader}_rank{trainer.global_rank}.pt"
            torch.save(data, path)
            self.paths.append(path)
            each_rank = f" (and those of the other {trainer.world_size - 1} ranks beside it)" if trainer.world_size > 1 else ""
            rank_zero_info(f"FeatureWriter: the features of {len(data['targets'])} images of loader {loader} -> {path}{each_rank}")
