"""Online weighted kNN accuracy on the evaluation split, with a bank of training features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adios_pl.backend import pl
from adios_pl.callbacks.base import EvaluationCallback, batch_parts
from adios_pl.distributed import gather_in_order, is_distributed
from adios_pl.metrics import knn_predict


class OnlineKNN(EvaluationCallback):
    """Weighted kNN (the InstDisc rule) on cosine similarity; logs ``val/knn_top1``, ``val/knn_top5``.

    The bank is the labelled training images under the evaluation transform (validation loader
    1), the queries the evaluation split (loader 0), both encoded by ``validation_step``. Under
    DDP the bank and queries of all ranks are gathered in dataset order without the sampler's
    padding, each rank scores its share of the queries, and the counts are summed, so the figure
    equals the single-process one. The similarity is computed in chunks of ``chunk_size``
    queries.

    Args:
        k: Neighbours (200 is the common fixed setting; not tuned on the evaluation split).
        temperature: Vote weight ``exp(sim / temperature)``.
        every_n_epochs: Run on these epochs only.
        max_bank_size: Keep only the first this-many bank images (``None`` for all).
        chunk_size: Queries scored at once.
    """

    def __init__(self, k: int = 200, temperature: float = 0.07, every_n_epochs: int = 1, max_bank_size: int | None = None, chunk_size: int = 1024) -> None:
        super().__init__(every_n_epochs)
        for name, value in (("k", k), ("chunk_size", chunk_size), ("max_bank_size", max_bank_size)):
            if value is None and name == "max_bank_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.k, self.temperature, self.max_bank_size, self.chunk_size = k, temperature, max_bank_size, chunk_size
        self._features: dict[int, list[Tensor]] = {0: [], 1: []}
        self._targets: dict[int, list[Tensor]] = {0: [], 1: []}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start collecting."""
        self._features, self._targets = {0: [], 1: []}, {0: [], 1: []}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the features of evaluation (0) and bank (1) images."""
        if dataloader_idx not in (0, 1) or not self._active(trainer):
            return
        _, targets, _ = batch_parts(batch)
        self._features[dataloader_idx].append(outputs["features"].detach())
        self._targets[dataloader_idx].append(targets)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score every query against the full bank and log top-1/top-5."""
        if not self._features[0]:
            return
        if not self._features[1]:
            self._warn_once("bank", "OnlineKNN: no kNN bank (validation loader 1) - the kNN accuracy is skipped")
            return
        queries = gather_in_order(torch.cat(self._features[0]), self._dataset_length(trainer, 0))
        query_targets = gather_in_order(torch.cat(self._targets[0]), self._dataset_length(trainer, 0))
        bank = gather_in_order(torch.cat(self._features[1]), self._dataset_length(trainer, 1))
        bank_targets = gather_in_order(torch.cat(self._targets[1]), self._dataset_length(trainer, 1))
        self._features, self._targets = {0: [], 1: []}, {0: [], 1: []}
        if self.max_bank_size is not None:
            bank, bank_targets = bank[: self.max_bank_size], bank_targets[: self.max_bank_size]
        labelled = bank_targets >= 0
        if not labelled.any():
            self._warn_once("labels", "OnlineKNN: the kNN bank has no labelled images - the kNN accuracy is skipped")
            return
        bank, bank_targets = bank[labelled], bank_targets[labelled]
        keep = query_targets >= 0
        if not keep.any():
            self._warn_once("query_labels", "OnlineKNN: the evaluation split has no labelled images - the kNN accuracy is skipped")
            return
        queries, query_targets = queries[keep], query_targets[keep]
        num_classes = int(max(bank_targets.max(), query_targets.max())) + 1
        hits = knn_hits(queries, query_targets, bank, bank_targets, num_classes, self.k, self.temperature, self.chunk_size)
        for i, top in enumerate((1, 5)):  # with fewer than 5 classes top-5 is trivially 1
            self._log_gathered(pl_module, f"val/knn_top{top}", hits[i] / max(len(query_targets), 1))


def knn_hits(queries: Tensor, query_targets: Tensor, bank: Tensor, bank_targets: Tensor, num_classes: int, k: int, temperature: float, chunk_size: int) -> Tensor:
    """Top-1 and top-5 hit counts ``(2,)``; under DDP each rank scores a share and counts are summed."""
    rank, world = 0, 1
    if is_distributed():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = -(-len(queries) // world)
    mine = slice(rank * share, (rank + 1) * share)
    scores = knn_predict(queries[mine], bank, bank_targets, num_classes, k, temperature, chunk_size)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == query_targets[mine].unsqueeze(1)
    hits = torch.stack([correct[:, :1].any(1).sum(), correct.any(1).sum()]).float()
    if is_distributed():
        torch.distributed.all_reduce(hits)
    return hits
