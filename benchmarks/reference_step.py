"""The reference ADIOS step's cost, for ``benchmarks/step_speed.py``.

Written the way the reference code does it: the clean view is re-encoded for every mask, in both
players; the mask generator runs once per player; the whole sum over masks is one loss and one
backward. It reuses adios-pl's objectives, so it is a timing baseline only; the exactness oracle
that shares no code with the library is ``tests/oracle.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from adios_pl.objectives import Objective, momentum_tau


def reference_penalty(areas: Tensor) -> Tensor:
    """The reference's sparsity penalty, verbatim: ``1 / (sin(pi * a) + 1e-10)``."""
    return 1.0 / (torch.sin(math.pi * areas) + 1e-10)


def hide(x2: Tensor, masks: Tensor, n: int, slots: Tensor | None) -> Tensor:
    """``x2 * (1 - m)``, with mask ``n`` for every image, or image b's own ``slots[b]``."""
    if slots is None:
        return x2 * (1 - masks[:, n : n + 1])
    rows = [masks[b, int(slots[b])] for b in range(x2.shape[0])]
    return x2 * (1 - torch.stack(rows).unsqueeze(1))


def reference_step(
    encoder: nn.Module,
    objective: Objective,
    mask_generator: nn.Module | None,
    x1: Tensor,
    x2: Tensor,
    enc_opt: torch.optim.Optimizer,
    mask_opt: torch.optim.Optimizer | None,
    num_masks: int,
    sparsity_weight: float,
    entropy_weight: float,
    step: int,
    total_steps: int,
    slots: Tensor | None = None,
    probe_forward: bool = False,
) -> None:
    """One batch of the reference game, in place.

    ``probe_forward`` adds the reference's extra forward of both views for its online
    classifier (what the reference pays per batch; the benchmark includes it).
    """
    terms = range(1) if (mask_generator is None or slots is not None) else range(num_masks)

    # Encoder step: masks detached, clean view re-encoded per mask, one backward of the sum.
    loss = torch.zeros((), dtype=x1.dtype)
    masks = mask_generator(x2).detach() if mask_generator is not None else None
    for n in terms:
        clean = objective(encoder, x1)
        view = x2 if masks is None else hide(x2, masks, n, slots)
        loss = loss + objective.loss(clean, objective(encoder, view))
    enc_opt.zero_grad()
    loss.backward()
    enc_opt.step()
    if probe_forward:
        with torch.no_grad():
            encoder(x1), encoder(x2)
    if mask_generator is None or mask_opt is None:
        _momentum_update(encoder, objective, step, total_steps)
        return

    # Mask step: the mask generator runs again and ascends L_mask; every module gets gradients,
    # only the mask optimiser steps.
    masks = mask_generator(x2)
    ssl = torch.zeros((), dtype=x1.dtype)
    for n in terms:
        clean = objective(encoder, x1)
        ssl = ssl + objective.loss(clean, objective(encoder, hide(x2, masks, n, slots)))
    areas = masks.mean(dim=(2, 3))
    penalty = sum(reference_penalty(areas[:, n]).mean() for n in range(num_masks))
    p = torch.softmax(areas, dim=1)
    l_mask = ssl - sparsity_weight * penalty + entropy_weight * (p * torch.log(p)).sum()
    mask_opt.zero_grad()
    (-l_mask).backward()
    mask_opt.step()
    _momentum_update(encoder, objective, step, total_steps)


def _momentum_update(encoder: nn.Module, objective: Objective, step: int, total_steps: int) -> None:
    """BYOL: the EMA after both players, as the reference's ``on_train_batch_end``."""
    if isinstance(getattr(objective, "tau", None), float) and step > 0:  # BYOL: EMA with the cosine tau
        byol: Any = objective
        tau = momentum_tau(step, total_steps, byol.base_tau, byol.final_tau)
        pairs = [(encoder, byol.momentum_encoder), (byol.projector, byol.momentum_projector)]
        with torch.no_grad():
            for online, target in pairs:
                for p, q in zip(online.parameters(), target.parameters()):
                    q.copy_(tau * q + (1 - tau) * p)
