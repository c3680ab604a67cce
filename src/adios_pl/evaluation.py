"""Offline evaluation of a frozen encoder: linear probe and kNN with fixed settings.

No hyper-parameter is chosen on the evaluation split (the reference picks its kNN setting on the
test split; here ``k=200, T=0.07`` is fixed, and the linear probe follows the reference's
schedule: SGD lr 0.1, momentum 0.9, batch 128, 100 epochs, x0.1 at epochs 60 and 80). The probe
trains on features computed once under the evaluation transform, not on augmented images, so a
100-epoch probe takes seconds; expect figures slightly below an augmented probe. The reference's
protocol -- a probe trained on augmented images (random resized crop and flip, features recomputed
every epoch) with LARS -- is ``evaluate_encoder(..., augment=True, optimizer="lars")``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from adios_pl.errors import ConfigurationError
from adios_pl.metrics import knn_predict
from adios_pl.modes import eval_mode
from adios_pl.optim import LARS

PROBE_OPTIMIZERS = ("sgd", "lars")


def _probe_optimizer(name: str, head: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "lars":
        return LARS(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigurationError(f"optimizer={name!r} is not supported; accepted: {list(PROBE_OPTIMIZERS)}")


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
    features, targets = [], []
    with eval_mode(encoder):
        for batch in loader:
            # a copy: an encoder replayed as CUDA graphs overwrites its last output at the next batch
            features.append(encoder(batch[0].to(device)).to(torch.float32, copy=True))
            targets.append(batch[1].to(device))
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
    optimizer: str = "sgd",
) -> float:
    """Top-1 accuracy of a linear classifier trained on frozen features (unlabelled rows dropped).

    Trains on the features' device (on a GPU a 100-epoch probe takes seconds; on a many-core
    CPU its thousands of small steps can take minutes); the shuffling is drawn on the CPU from
    ``seed``, so the order is the same on every device.
    """
    keep = train_targets >= 0
    x, y = train_features[keep], train_targets[keep].to(train_features.device)
    if len(y) == 0:
        raise ConfigurationError("linear_probe: no labelled training features (every target is -1)")
    generator = torch.Generator().manual_seed(seed)
    head = seeded_linear(x.shape[1], num_classes, seed).to(x.device)
    opt = _probe_optimizer(optimizer, head, lr, weight_decay)
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


def probe_augmentation(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], Tensor]:
    """The augmented probe's training transform (the reference's linear-evaluation augmentation):
    a random resized crop of 0.08 to 1 of the area (bicubic), a horizontal flip with probability
    0.5, then normalisation with ``mean`` and ``std``."""
    return T.Compose([
        T.ToImage(), T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std),
    ])


def augmented_linear_probe(
    encoder: nn.Module,
    datamodule: Any,
    device: str | torch.device = "cpu",
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 128,
    optimizer: str = "lars",
    seed: int = 0,
    eval_features: tuple[Tensor, Tensor] | None = None,
) -> float:
    """The reference's offline protocol: a linear head on the frozen encoder, trained on augmented
    labelled training images (random resized crop 0.08-1 and flip, new draws every epoch), scored
    on the evaluation split under the evaluation transform. lr x0.1 at 60 % and 80 % of the epochs.

    ``eval_features``: the evaluation split's ``(features, targets)`` if already extracted with
    this encoder (they are extracted otherwise). The encoder runs in eval mode (its batch-norm
    statistics stay as they are) and is left in the mode it was in.
    """
    from torch.utils.data import DataLoader

    from adios_pl.data.base import Transformed

    datamodule.setup("fit")
    if datamodule.bank_set is None or datamodule.eval_set is None:
        raise ConfigurationError("augmented_linear_probe needs a DataModule with an evaluation split and labelled training images")
    augment = probe_augmentation(datamodule.image_size, datamodule.mean, datamodule.std)
    torch.manual_seed(seed)
    train = DataLoader(Transformed(datamodule.bank_set, augment, keep_extra=False), batch_size=batch_size, shuffle=True,
                       num_workers=datamodule.num_workers)
    encoder = encoder.to(device)
    head = seeded_linear(int(getattr(encoder, "num_features")), int(datamodule.num_classes), seed).to(device)
    opt = _probe_optimizer(optimizer, head, lr, 0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.6 * epochs), int(0.8 * epochs)], gamma=0.1)
    with eval_mode(encoder):
        for _ in range(epochs):
            for images, targets in train:
                keep = targets >= 0
                if not keep.any():
                    continue
                with torch.no_grad():
                    features = encoder(images[keep].to(device)).float()
                loss = F.cross_entropy(head(features), targets[keep].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        if eval_features is None:
            eval_features = extract_features(encoder, datamodule.val_dataloader()[0], device)
    test_x, test_y = (t.to(device) for t in eval_features)
    with torch.no_grad():
        keep = test_y >= 0
        return float((head(test_x[keep]).argmax(1) == test_y[keep]).float().mean())


def evaluate_encoder(
    encoder: nn.Module,
    datamodule: Any,
    device: str | torch.device | None = None,
    epochs: int = 100,
    k: int = 200,
    temperature: float = 0.07,
    augment: bool = False,
    optimizer: str = "sgd",
) -> dict[str, float]:
    """Offline linear-probe and kNN top-1 of ``encoder`` on a DataModule's evaluation split.

    Uses ``val_dataloader()``: loader 1 (labelled training images) to fit, loader 0 to score.
    ``augment=True`` trains the probe on augmented images instead of fixed features
    (:func:`augmented_linear_probe`, the reference's protocol with ``optimizer="lars"``).
    ``device=None`` runs on the GPU where there is one (the encoder is moved there), else the CPU.

    Args:
        encoder: Maps ``(B, 3, H, W)`` images to ``(B, D)`` features; evaluated frozen, in eval mode.
        datamodule: An :class:`~adios_pl.data.SSLDataModule` (or any with the same two evaluation loaders).
        device: Where to compute (``"cpu"``, ``"cuda"``, ...); ``None``: the GPU where there is one.
        epochs: Epochs of the linear probe (its rate falls x0.1 at 60 % and 80 % of them).
        k: Neighbours of the kNN classifier.
        temperature: Temperature of the kNN classifier's weights (cosine similarity).
        augment: Train the probe on fresh crops and flips each epoch instead of fixed features.
        optimizer: The probe's optimiser: ``"sgd"`` or ``"lars"``.
    """
    if optimizer not in PROBE_OPTIMIZERS:
        raise ConfigurationError(f"optimizer={optimizer!r} is not supported; accepted: {list(PROBE_OPTIMIZERS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    datamodule.setup("fit")
    loaders = datamodule.val_dataloader()
    if len(loaders) < 2:
        raise ConfigurationError("evaluate_encoder needs a DataModule with an evaluation split and labelled training images")
    encoder = encoder.to(device)
    test_x, test_y = extract_features(encoder, loaders[0], device)
    train_x, train_y = extract_features(encoder, loaders[1], device)
    num_classes = int(datamodule.num_classes)
    if augment:
        linear = augmented_linear_probe(encoder, datamodule, device, epochs=epochs, optimizer=optimizer, eval_features=(test_x, test_y))
    else:
        linear = linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=epochs, optimizer=optimizer)
    return {"linear_top1": linear, "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k, temperature)}
