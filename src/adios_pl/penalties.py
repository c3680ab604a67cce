"""The mask penalties of ADIOS and the helpers that apply masks; small pure functions.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100 (Eq. 4 and Appendix)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: The reference adds this inside the division; it keeps the penalty finite (about 1e10) at 0 or 1.
SPARSITY_EPS = 1e-10


def mask_areas(masks: Tensor) -> Tensor:
    """Fraction of each image that each mask covers: ``(B, N, H, W) -> (B, N)`` in [0, 1]."""
    return masks.mean(dim=(-2, -1))


def sparsity_penalty(areas: Tensor) -> Tensor:
    """Per-mask sparsity penalty ``1 / sin(pi * area)``: ``(B, N) -> (B, N)``, at least 1.

    Smallest (1) at half coverage and growing without bound toward 0 or 1, which rules out the
    degenerate "one slot covers everything" solution. The reference computes
    ``1 / (sin(pi * a) + 1e-10)``; in float32 ``sin(pi * 1.0)`` is about -8.7e-8, so there a fully
    saturated mask gets a huge *negative* penalty, and areas that round slightly above 1 do too.
    This uses the symmetry ``sin(pi * a) = sin(pi * (1 - a))`` on the clamped area, which gives
    the reference's value wherever the reference is well-defined and a large positive finite
    value (1e10) at exactly 0 or 1.
    """
    a = areas.clamp(0.0, 1.0)
    return 1.0 / (torch.sin(math.pi * torch.minimum(a, 1.0 - a)) + SPARSITY_EPS)


def entropy_term(areas: Tensor) -> Tensor:
    """``sum_b sum_n p_bn log p_bn`` with ``p_b = softmax_n(area_b)``: ``(B, N) -> ()``.

    This is the *negative* entropy summed over the batch, as in the reference.
    """
    log_p = areas.log_softmax(dim=1)
    return (log_p.exp() * log_p).sum()


def sample_slots(batch_size: int, num_masks: int, generator: torch.Generator | None = None) -> Tensor:
    """ADIOS-s: one slot per image, drawn uniformly; ``(B,)`` long on the CPU."""
    return torch.randint(num_masks, (batch_size,), generator=generator)


def masked_view(images: Tensor, masks: Tensor, slot: int | Tensor) -> Tensor:
    """Hide the pixels of one mask: ``images * (1 - m)``.

    Args:
        images: Normalised views ``(B, 3, H, W)``; a hidden pixel becomes 0, the data mean.
        masks: Soft masks ``(B, N, H, W)``.
        slot: One slot for the whole batch (int), or one per image (``(B,)`` long, ADIOS-s).
    """
    if isinstance(slot, int):
        mask = masks[:, slot : slot + 1]
    else:
        mask = masks[torch.arange(masks.shape[0], device=masks.device), slot.to(masks.device)].unsqueeze(1)
    return images * (1.0 - mask)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """Identity forward, negated gradient backward (for the simultaneous two-player update)."""
    out: Tensor = _ReverseGradient.apply(x)
    return out
