"""The mask penalties of ADIOS: small pure functions.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100 (Eq. 4 and Appendix)
"""

from __future__ import annotations

import math

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


# Kept importable from here for code written against earlier versions.
from adios_pl.masking import masked_view, reverse_gradient, sample_slots  # noqa: E402,F401

__all__ = ["SPARSITY_EPS", "entropy_term", "mask_areas", "masked_view", "reverse_gradient", "sample_slots", "sparsity_penalty"]
