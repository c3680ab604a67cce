"""Optimisers and learning-rate schedules for both players.

Schedules are pure functions of the batch index (not of Lightning's ``global_step``).
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any, Callable, Iterable, cast

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
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0; got {lr}, {momentum}, {weight_decay}, {eta}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr,
            exclude_bias_n_norm=exclude_bias_n_norm, eps=eps,
        )
        super().__init__(params, defaults)
        #: Multi-tensor (``torch._foreach_*``) update: a few kernels per step instead of a few per
        #: weight. ``None``: on when every parameter is on a CUDA device.
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor | None] = []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            foreach = self.foreach
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            if foreach:
                self._foreach_group(group, params, grads, buffers)
            else:
                self._loop_group(group, params, grads, buffers)
            if group["momentum"] != 0:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        return loss

    def _init_group(self, group: dict, params: list[Tensor], grads: list[Tensor], buffers: list[Tensor | None]) -> None:
        """Collect the group's weights that have a gradient, the gradients and the momentum
        buffers (``None`` before the first step), as torch's optimisers do: ``torch.compile``
        runs this part eagerly and traces the update alone."""
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                buffers.append(self.state[p].get("momentum_buffer"))

    def _loop_group(self, group: dict, params: list[Tensor], grads: list[Tensor], buffers: list[Tensor | None]) -> None:
        """The update of one group, weight by weight (the readable version)."""
        lr, wd, eta, eps = group["lr"], group["weight_decay"], group["eta"], group["eps"]
        for i, (p, d_p) in enumerate(zip(params, grads)):
            if p.ndim != 1 or not group["exclude_bias_n_norm"]:
                p_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(d_p)
                scale = eta * p_norm / (g_norm + p_norm * wd + eps)
                if group["clip_lr"]:
                    scale = _clipped(scale, lr)
                # As the reference: neither scaling nor weight decay where either norm is zero.
                d_p = torch.where((p_norm > 0) & (g_norm > 0), d_p.add(p, alpha=wd) * scale, d_p)
            if group["momentum"] != 0:
                buffer = buffers[i]
                if buffer is None:
                    buffer = buffers[i] = d_p.detach().clone()
                else:
                    buffer.mul_(group["momentum"]).add_(d_p)
                d_p = buffer
            if isinstance(lr, Tensor):
                p.sub_(d_p * lr)
            else:
                p.add_(d_p, alpha=-lr)

    def _foreach_group(self, group: dict, params: list[Tensor], grads: list[Tensor], buffers: list[Tensor | None]) -> None:
        """The same update as :meth:`_loop_group` with multi-tensor kernels."""
        lr, wd, eta, eps, momentum = group["lr"], group["weight_decay"], group["eta"], group["eps"], group["momentum"]
        scaled = [i for i, p in enumerate(params) if p.ndim != 1 or not group["exclude_bias_n_norm"]]
        updates = list(grads)
        if scaled:
            ps, gs = [params[i] for i in scaled], [grads[i] for i in scaled]
            p_norm = torch.stack(torch._foreach_norm(ps))
            g_norm = torch.stack(torch._foreach_norm(gs))
            scale = eta * p_norm / (g_norm + p_norm * wd + eps)
            if group["clip_lr"]:
                scale = _clipped(scale, lr)
            # As the reference: neither scaling nor weight decay where either norm is zero.
            active = (p_norm > 0) & (g_norm > 0)
            decay = torch._foreach_mul(ps, list((active.to(p_norm.dtype) * wd).unbind()))
            d = torch._foreach_add(gs, decay)
            torch._foreach_mul_(d, list(torch.where(active, scale, 1.0).unbind()))
            for i, u in zip(scaled, d):
                updates[i] = u
        if momentum != 0:
            kept = [(b, u) for b, u in zip(buffers, updates) if b is not None]
            if kept:
                torch._foreach_mul_([b for b, _ in kept], momentum)
                torch._foreach_add_([b for b, _ in kept], [u for _, u in kept])
            for i, b in enumerate(buffers):  # the first step: a buffer starts as the update
                if b is None:
                    buffers[i] = updates[i].detach().clone()
            updates = [cast(Tensor, b) for b in buffers]
        if isinstance(lr, Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(updates, lr))
        else:
            torch._foreach_add_(params, updates, alpha=-lr)


def _clipped(scale: Tensor, lr: float | Tensor) -> Tensor:
    """LARS's trust ratio ``scale`` over the learning rate, at most 1 (1 where the rate is 0). A
    rate held as a tensor (:func:`compile_step`'s) is compared on the device."""
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, torch.clamp(scale / lr, max=1.0), 1.0)
    return torch.clamp(scale / lr, max=1.0) if lr > 0 else torch.ones_like(scale)


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter] | Iterable[dict],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    lars_eta: float = 0.02,
) -> Optimizer:
    """Create ``"sgd"`` (momentum, no Nesterov), ``"lars"`` or ``"adamw"`` over ``params`` (or groups)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not supported; accepted: {list(OPTIMIZERS)}")


def compile_step(optimizer: Optimizer, options: dict[str, Any]) -> None:
    """Compile ``optimizer``'s update with ``torch.compile`` (Inductor ``options``), in place.

    ``optimizer.step(closure)`` then runs the closure eagerly and the update (the class's own
    ``step``, without torch's profiling and hook wrapper) compiled, under ``torch.no_grad`` from
    the start so that the compiled code updates the weights in place: a few fused kernels instead
    of several per weight or per group. For the compiled call only, each group's learning rate
    is a 0-d tensor on its weights' device, filled from the number in ``group["lr"]``
    (one small kernel, no read-back); the number is put back after, so schedulers, checkpoints
    and logs see numbers as before. A rate that changes is then data, not a constant of the
    graph: an optimiser makes two graphs (before and after its state exists), and no float
    reaches the compiler (Inductor in torch 2.14.1, on the CPU, baked in a float that a graph
    uses both as an ``alpha`` and in a tensor operation: LARS's clipped rate went stale).
    Optimiser step hooks (``register_step_pre_hook``) are not run. Each optimiser's update has a
    code object of its own, since dynamo keeps at most 8 graphs per code object and runs the
    function eagerly beyond. Call before creating a scheduler, which wraps ``step``. For :class:`LARS` and
    ``torch.optim.SGD`` (AdamW's multi-tensor update takes a tensor rate only with its state on
    the device, which a run resumed from an uncompiled checkpoint does not have).
    """
    if not isinstance(optimizer, (LARS, torch.optim.SGD)):
        raise ValueError(f"compile_step supports LARS and SGD, got {type(optimizer).__name__}")
    update = inspect.unwrap(type(optimizer).step)

    def run() -> None:
        update(optimizer)

    name = f"{type(optimizer).__name__}_update"  # in dynamo's logs and profiles
    run.__code__ = run.__code__.replace(co_name=name)  # a new code object: its graphs are counted apart
    run.__name__ = run.__qualname__ = name
    compiled = torch.compile(run, options=options)
    rates: list[Tensor] = []

    def step(self: Optimizer, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[len(rates):]:  # groups added since, too
            weight = group["params"][0] if group["params"] else torch.zeros(())
            # float32 for float32 and narrower weights, as eager's kernels take the rate
            rates.append(torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device))
        numbers = [group["lr"] for group in self.param_groups]
        try:
            for group, rate, number in zip(self.param_groups, rates, numbers):
                group["lr"] = rate.fill_(number)
            with torch.no_grad():
                compiled()
        finally:
            for group, number in zip(self.param_groups, numbers):
                group["lr"] = number
        return loss

    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]


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


def warmup_cosine_epochs(epoch: int, warmup_epochs: int, max_epochs: int, start_factor: float = 0.0, min_factor: float = 0.0) -> float:
    """Learning-rate factor of epoch ``epoch`` under the reference's per-epoch schedule.

    The closed form of pl_bolts' ``LinearWarmupCosineAnnealingLR`` (the reference steps it once
    per epoch): ``start_factor`` at epoch 0, rising linearly to 1 at epoch ``warmup_epochs - 1``,
    then a half cosine from 1 (at ``warmup_epochs``) to ``min_factor`` (at ``max_epochs``).
    ``start_factor`` is the reference's ``warmup_start_lr`` divided by the base rate.
    """
    if epoch < warmup_epochs:
        return start_factor + epoch * (1.0 - start_factor) / max(1, warmup_epochs - 1)
    progress = min((epoch - warmup_epochs) / max(max_epochs - warmup_epochs, 1), 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(step: int, start_factor: float = 1.0, steps_per_epoch: int = 0) -> float:
    """Factor 1, except ``start_factor`` during the first epoch when ``steps_per_epoch`` is set."""
    return start_factor if steps_per_epoch and step < steps_per_epoch else 1.0


def _per_epoch(step: int, steps_per_epoch: int, **kw: float) -> float:
    return warmup_cosine_epochs(step // steps_per_epoch, **kw)  # type: ignore[arg-type]


def schedule_factor(
    interval: str,
    warmup_epochs: float,
    steps_per_epoch: int,
    total_steps: int,
    start_factor: float = 0.0,
    min_factor: float = 0.0,
    constant: bool = False,
) -> Callable[[int], float]:
    """The learning-rate factor of one parameter group as a pure function of the batch index.

    ``interval="step"``: :func:`warmup_cosine` over batches (warm-up from ``start_factor``).
    ``interval="epoch"``: :func:`warmup_cosine_epochs`, held for every batch of an epoch, as the
    reference. ``constant``: 1 throughout (the reference's SimSiam predictor: the first epoch
    still runs at ``start_factor`` under the per-epoch schedule).
    """
    if interval == "epoch":
        if constant:
            return functools.partial(_constant, start_factor=start_factor, steps_per_epoch=steps_per_epoch)
        max_epochs = max(math.ceil(total_steps / steps_per_epoch), 1)
        return functools.partial(
            _per_epoch, steps_per_epoch=steps_per_epoch, warmup_epochs=round(warmup_epochs),
            max_epochs=max_epochs, start_factor=start_factor, min_factor=min_factor,
        )
    if constant:
        return _constant
    warmup = round(warmup_epochs * steps_per_epoch) if warmup_epochs > 0 else 0
    base = functools.partial(warmup_cosine, warmup_steps=warmup, total_steps=total_steps, min_factor=min_factor)
    if start_factor == 0:
        return base
    return functools.partial(_from_start, base=base, warmup=warmup, start_factor=start_factor)


def _from_start(step: int, base: Callable[[int], float], warmup: int, start_factor: float) -> float:
    factor = base(step)
    return start_factor + (1.0 - start_factor) * factor if step < warmup else factor
