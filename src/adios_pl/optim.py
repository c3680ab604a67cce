"""Optimisers and learning-rate schedules for both players.

Schedules are pure functions of the batch index (not of Lightning's ``global_step``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as in the ADIOS reference.

    For each weight ``p`` with gradient ``g`` the update is scaled by
    ``min(eta * |p| / (|g| + wd * |p| + eps) / lr, 1)`` when ``clip_lr`` (the reference's
    setting), or by ``eta * |p| / (|g| + wd * |p| + eps)`` otherwise. Biases and normalisation
    weights (1-D tensors) are left out of both the scaling and the weight decay when
    ``exclude_bias_n_norm``. Unlike lightly's ``LARS`` (no clipping, excluded parameters chosen
    by ``weight_decay=0``), this one matches the reference and makes no host synchronisation.

    - [0] LARS, 2017, https://arxiv.org/abs/1708.03888
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = True,
        exclude_bias_n_norm: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0; got {lr}, {momentum}, {weight_decay}, {eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr,
            exclude_bias_n_norm=exclude_bias_n_norm, eps=eps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eta, eps = group["lr"], group["weight_decay"], group["eta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p: Tensor = p.grad
                if p.ndim != 1 or not group["exclude_bias_n_norm"]:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(d_p)
                    scale = eta * p_norm / (g_norm + p_norm * wd + eps)
                    if group["clip_lr"]:
                        scale = torch.clamp(scale / lr, max=1.0) if lr > 0 else torch.ones_like(scale)
                    # No scaling where either norm is zero (fresh zero-initialised weights).
                    scale = torch.where((p_norm > 0) & (g_norm > 0), scale, torch.ones_like(scale))
                    d_p = d_p.add(p, alpha=wd) * scale
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                    d_p = state["momentum_buffer"]
                p.add_(d_p, alpha=-lr)
        return loss


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    lars_eta: float = 0.02,
) -> Optimizer:
    """Create ``"sgd"`` (momentum, no Nesterov), ``"lars"`` or ``"adamw"`` over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not supported; accepted: {list(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate factor at batch ``step``: linear warm-up, then cosine decay to ``min_factor``.

    ``(step + 1) / warmup_steps`` during the first ``warmup_steps`` batches, then a half cosine
    from 1 to ``min_factor`` over the remaining batches.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per batch with :func:`warmup_cosine`."""
    fn = functools.partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_factor=min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
