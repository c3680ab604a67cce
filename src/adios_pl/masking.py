"""Applying masks: hide one slot of each image, draw ADIOS-s slots, reverse a gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
