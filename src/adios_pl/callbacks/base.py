"""Shared pieces of the evaluation callbacks."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from adios_pl.backend import pl, rank_zero_warn


class EvaluationCallback(pl.Callback):
    """Collects what the validation batches of loader 0 (evaluation split) and 1 (kNN bank) give.

    ``every_n_epochs`` thins out the epochs on which it runs.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        self._warned: set[str] = set()

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def _log_gathered(pl_module: pl.LightningModule, name: str, value: Tensor) -> None:
        """Log a score computed from every rank's gathered rows, so the same on every rank.

        Declared synchronised (``sync_dist`` with ``max``, exact for equal values: one all-reduce
        of a scalar per score and validation): logged without it, Lightning warns in every
        multi-GPU run that an epoch-level value should be synchronised across devices.
        """
        pl_module.log(name, value, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")

    @staticmethod
    def _dataset_length(trainer: pl.Trainer, dataloader_idx: int) -> int | None:
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            return len(loaders[dataloader_idx].dataset)
        except (TypeError, IndexError, AttributeError):
            return None


def batch_parts(batch: Any) -> tuple[Any, Any, Any]:
    """``(images, targets, segmentation or None)`` of a validation batch ``(images, targets, *extra)``.

    Only a tensor after the targets is a segmentation: lightly's ``LightlyDataset`` puts file names there.
    """
    images, targets, *rest = batch
    return images, targets, rest[0] if rest and isinstance(rest[0], Tensor) else None
