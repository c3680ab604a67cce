"""Evaluation maths as pure functions: weighted kNN, and mask-quality scores.

- [0] InstDisc (weighted kNN), 2018, https://arxiv.org/abs/1805.01978
- [1] IODINE (foreground ARI), 2019, https://arxiv.org/abs/1903.00450
- [2] GENESIS (segmentation covering, mean and weighted), 2020, https://arxiv.org/abs/1907.13052
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.clustering import adjusted_rand_score


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``(Q, num_classes)`` of weighted kNN on cosine similarity.

    Each query's ``k`` most similar bank features vote for their label with weight
    ``exp(similarity / temperature)``. Queries go in chunks of ``chunk_size`` so the full
    ``Q x M`` similarity matrix never exists at once.

    Args:
        queries: ``(Q, D)`` features.
        bank: ``(M, D)`` features.
        bank_labels: ``(M,)`` labels in ``[0, num_classes)``.
    """
    if bank.shape[0] == 0:
        raise ValueError("the kNN memory bank is empty: no labelled training features were collected")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        # scatter the k weighted votes: memory chunk x (k + classes), not chunk x k x classes
        scores = q.new_zeros(q.shape[0], num_classes)
        out.append(scores.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else queries.new_zeros(0, num_classes)


def foreground_ari(pred: Tensor, true: Tensor) -> Tensor:
    """Adjusted Rand index on the foreground pixels (``true != 0``) of each image: ``(B,)``.

    Args:
        pred: ``(B, H, W)`` predicted segment ids (the argmax slot).
        true: ``(B, H, W)`` ground-truth ids, 0 = background.

    Images without foreground get NaN (average with ``nanmean``). An image whose foreground is
    a single object scores 1 when one segment covers it and 0 otherwise (torchmetrics' ARI).
    """
    scores = []
    for p, t in zip(pred.flatten(1), true.flatten(1)):
        fg = t != 0
        if not fg.any():
            scores.append(torch.tensor(float("nan")))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores.append(adjusted_rand_score(p[fg], t[fg]).float().cpu())
    return torch.stack(scores) if scores else torch.zeros(0)


def adjusted_rand_index(pred: Tensor, true: Tensor) -> Tensor:
    """Adjusted Rand index on all pixels of each image, the background a segment like the
    objects: ``(B,)`` (torchmetrics' ARI).

    Args:
        pred: ``(B, H, W)`` predicted segment ids.
        true: ``(B, H, W)`` ground-truth ids.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = [adjusted_rand_score(p, t).float().cpu() for p, t in zip(pred.flatten(1), true.flatten(1))]
    return torch.stack(scores) if scores else torch.zeros(0)


def _best_overlaps(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """For each ground-truth object of one image (``true`` ids other than 0, flattened), its pixel
    count and its best IoU with any predicted segment: two ``(objects,)`` tensors."""
    segments = F.one_hot(pred.long()).bool().T  # (S, P)
    sizes, best = [], []
    for obj in true.unique():
        if obj == 0:
            continue
        target = true == obj
        inter = (segments & target).sum(dim=1).float()
        union = (segments | target).sum(dim=1).float()
        sizes.append(target.sum().float())
        best.append((inter / union).max())
    if not best:
        return torch.zeros(0), torch.zeros(0)
    return torch.stack(sizes).cpu(), torch.stack(best).cpu()


def segmentation_coverings(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """Both segmentation coverings of each image (GENESIS): each ground-truth object's best IoU
    with any predicted segment, averaged over the objects plainly (mSC, the mean best overlap)
    and weighted by their pixel counts (SC): two ``(B,)`` tensors.

    Args:
        pred: ``(B, H, W)`` predicted segment ids.
        true: ``(B, H, W)`` ground-truth ids, 0 = background (not scored).

    Images without objects get NaN.
    """
    mean, weighted = [], []
    for p, t in zip(pred.flatten(1), true.flatten(1)):
        sizes, best = _best_overlaps(p, t)
        mean.append(best.mean() if len(best) else torch.tensor(float("nan")))
        weighted.append((sizes * best).sum() / sizes.sum() if len(best) else torch.tensor(float("nan")))
    return (torch.stack(mean), torch.stack(weighted)) if mean else (torch.zeros(0), torch.zeros(0))


def mean_best_overlap(pred: Tensor, true: Tensor) -> Tensor:
    """Mean over the ground-truth objects of each image of the best IoU with any segment: ``(B,)``
    (GENESIS' mean segmentation covering; see :func:`segmentation_coverings`)."""
    return segmentation_coverings(pred, true)[0]


def segmentation_covering(pred: Tensor, true: Tensor) -> Tensor:
    """Segmentation covering of each image: the objects' best IoU weighted by their pixel counts:
    ``(B,)`` (see :func:`segmentation_coverings`)."""
    return segmentation_coverings(pred, true)[1]


def random_patch_segmentation(batch: int, size: int, num_segments: int, patch: int, generator: torch.Generator | None = None) -> Tensor:
    """A baseline segmentation ``(B, size, size)`` of segment ids: the ``random_patch`` masks of
    :class:`~adios_pl.masks.RandomMasks` (``patch x patch`` cells dealt evenly to the segments)."""
    from adios_pl.masks import RandomMasks  # the one random-patch generator

    masks = RandomMasks(num_segments, size, kind="random_patch", patch_size=patch)
    masks.generator = generator
    device = generator.device if generator is not None else torch.device("cpu")
    return masks.segments(batch, size, size, device)
