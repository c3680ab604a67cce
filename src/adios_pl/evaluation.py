"""Offline evaluation of a frozen encoder: linear probe and kNN with fixed settings.

No hyper-parameter is chosen on the evaluation split (the reference picks its kNN setting on the
test split; here ``k=200, T=0.07`` is fixed, and the linear probe follows the reference's
schedule: SGD lr 0.1, momentum 0.9, batch 128, 100 epochs, x0.1 at epochs 60 and 80). The probe
trains on features computed once under the evaluation transform, not on augmented images, so a
100-epoch probe takes seconds; expect figures slightly below an augmented probe.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adios_pl.metrics import knn_predict


def seeded_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    """A linear layer with PyTorch's default-range uniform weights drawn from ``seed`` and zero bias.

    The same seed gives the same layer on every rank, without a broadcast.
    """
    layer = nn.Linear(in_features, out_features)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / in_features**0.5
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    return layer


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable[Any], device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Features and targets of every batch ``(images, targets, ...)`` of ``loader`` (eval mode), on ``device``.

    They stay where they were computed, so the probe and kNN that follow run there too.
    """
    was_training = encoder.training
    encoder.eval()
    features, targets = [], []
    for batch in loader:
        features.append(encoder(batch[0].to(device)).float())
        targets.append(batch[1].to(device))
    encoder.train(was_training)
    return torch.cat(features), torch.cat(targets)


def linear_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of a linear classifier trained on frozen features (unlabelled rows dropped).

    Trains on the features' device (on a GPU a 100-epoch probe takes seconds; on a many-core
    CPU its thousands of small steps can take minutes); the shuffling is drawn on the CPU from
    ``seed``, so the order is the same on every device.
    """
    keep = train_targets >= 0
    x, y = train_features[keep], train_targets[keep].to(train_features.device)
    if len(y) == 0:
        raise ValueError("linear_probe: no labelled training features")
    generator = torch.Generator().manual_seed(seed)
    head = seeded_linear(x.shape[1], num_classes, seed).to(x.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.6 * epochs), int(0.8 * epochs)], gamma=0.1)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        test_targets = test_targets.to(x.device)
        keep = test_targets >= 0
        return float((head(test_features.to(x.device)[keep]).argmax(1) == test_targets[keep]).float().mean())


def knn_accuracy(train_features: Tensor, train_targets: Tensor, test_features: Tensor, test_targets: Tensor, num_classes: int, k: int = 200, temperature: float = 0.07) -> float:
    """Top-1 accuracy of weighted kNN (fixed ``k`` and ``temperature``), on the training features' device."""
    train_targets, test_targets = train_targets.to(train_features.device), test_targets.to(train_features.device)
    keep = train_targets >= 0
    scores = knn_predict(test_features.to(train_features.device), train_features[keep], train_targets[keep], num_classes, k, temperature)
    keep_test = test_targets >= 0
    return float((scores.argmax(1)[keep_test] == test_targets[keep_test]).float().mean())


def evaluate_encoder(encoder: nn.Module, datamodule: Any, device: str | torch.device = "cpu", epochs: int = 100, k: int = 200, temperature: float = 0.07) -> dict[str, float]:
    """Offline linear-probe and kNN top-1 of ``encoder`` on a DataModule's evaluation split.

    Uses ``val_dataloader()``: loader 1 (labelled training images) to fit, loader 0 to score.
    """
    datamodule.setup("fit")
    loaders = datamodule.val_dataloader()
    if len(loaders) < 2:
        raise ValueError("evaluate_encoder needs a DataModule with an evaluation split and labelled training images")
    encoder = encoder.to(device)
    test_x, test_y = extract_features(encoder, loaders[0], device)
    train_x, train_y = extract_features(encoder, loaders[1], device)
    num_classes = int(datamodule.num_classes)
    return {
        "linear_top1": linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=epochs),
        "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k, temperature),
    }
