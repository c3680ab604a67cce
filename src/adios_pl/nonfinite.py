"""Non-finite losses and gradients, decided on the device.

A training step never reads a value back to the host to decide what to do about a NaN: the
check is a tensor, and so is what follows from it.

- :func:`all_finite`: one boolean tensor for a batch's losses and gradient norms, the same on
  every rank.
- :class:`StateSnapshot` (``nonfinite="skip"``): a copy of everything a batch changes,
  restored where the batch turned out non-finite (``torch.where``: no branch on the host).
- :class:`FirstFailure` (``nonfinite="raise"``): records the first non-finite batch on the
  device; :meth:`FirstFailure.raise_if_any` reads it back, at logging intervals, epoch ends and
  before checkpoints, and raises naming the batch and the values.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from adios_pl.distributed import is_distributed


def gradient_norm(params: Iterable[nn.Parameter]) -> Tensor | None:
    """The global L2 norm of the gradients of ``params`` (``None`` when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def all_finite(values: Sequence[Tensor]) -> Tensor:
    """A 0-d bool tensor: every entry of ``values`` is finite, on every rank (one all-reduce)."""
    device = values[0].device
    ok = torch.isfinite(torch.stack([v.detach().float().reshape(()).to(device) for v in values])).all()
    if is_distributed():  # every rank must take the same decision
        flag = ok.float()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = flag > 0
    return ok


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


class StateSnapshot:
    """Copies of a module's parameters and buffers and of optimisers' states, taken before a
    batch, to put back where the batch proved non-finite.

    Optimiser state created during the batch (the first step's momentum buffers, Adam's moments)
    goes back to zeros, which is what a fresh state amounts to for SGD, LARS and AdamW.
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[Any]) -> None:
        seen: set[int] = set()
        self.tensors: list[tuple[Tensor, Tensor]] = []
        for tensor in module.state_dict(keep_vars=True).values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.tensors.append((tensor, tensor.detach().clone()))
        self.optimizers = [_inner(opt) for opt in optimizers]
        self.states = [
            {id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state.get(p, {}).items()} for g in opt.param_groups for p in g["params"]}
            for opt in self.optimizers
        ]

    @torch.no_grad()
    def restore_unless(self, ok: Tensor) -> None:
        """Keep the current state where ``ok`` (a 0-d bool tensor), else put the copy back.

        No read-back, except for state kept on another device than ``ok`` (AdamW's step count
        lives on the CPU) or held as a Python number.
        """
        for live, copy in self.tensors:
            live.copy_(torch.where(ok.to(live.device), live, copy))
        for opt, saved_states in zip(self.optimizers, self.states):
            for group in opt.param_groups:
                for p in group["params"]:
                    saved = saved_states.get(id(p), {})
                    for key, value in opt.state.get(p, {}).items():
                        before = saved.get(key)
                        if isinstance(value, Tensor):
                            old = before if isinstance(before, Tensor) else torch.zeros_like(value)
                            value.copy_(torch.where(ok.to(value.device), value, old))
                        elif before is not None and not bool(ok):  # a Python number: read ok (rare)
                            opt.state[p][key] = before


class FirstFailure:
    """The first non-finite batch, kept on the device until read back (:meth:`record` takes the
    names of the checked values with them, in the order of the step)."""

    def __init__(self) -> None:
        self.step: Tensor | None = None
        self.values: Tensor | None = None
        self.last_finite: Tensor | None = None
        self.names: list[str] = []
        self.epochs: dict[int, int] = {}  # batch -> epoch, for the steps not yet read back

    def record(self, ok: Tensor, step: int, epoch: int, names: list[str], values: Sequence[Tensor]) -> None:
        """Note batch ``step``'s ``values`` if it is the first with ``ok`` false; keep the last
        finite values otherwise. No host synchronisation."""
        stacked = torch.stack([v.detach().float().reshape(()).to(ok.device) for v in values])
        if self.step is None or names != self.names:
            self.names = names
            self.step = torch.full((), -1, dtype=torch.long, device=ok.device)
            self.values = torch.full_like(stacked, float("nan"))
            self.last_finite = torch.full_like(stacked, float("nan"))
        assert self.values is not None and self.last_finite is not None
        first = (~ok) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.values = torch.where(first, stacked, self.values)
        self.last_finite = torch.where(ok, stacked, self.last_finite)
        self.epochs[step] = epoch

    def raise_if_any(self) -> None:
        """Read back (one host synchronisation) and raise ``FloatingPointError`` if a batch was
        non-finite."""
        if self.step is None:
            return
        step = int(self.step)
        if step < 0:
            self.epochs.clear()
            return
        assert self.values is not None and self.last_finite is not None
        # in the order the step computed them: the first is the cause, the rest may follow from it
        bad = [(k, v) for k, v in zip(self.names, self.values.tolist()) if not _finite(v)]
        name, value = bad[0]
        cause = f"{name}={value}" if name.endswith("_loss") else f"a non-finite gradient ({name} {value}) with finite losses before it"
        later = ", ".join(f"{k}={v}" for k, v in bad[1:])
        cause += f" (then {later})" if later else ""
        last = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.last_finite.tolist()) if k.endswith("_loss") and _finite(v))
        epoch = self.epochs.get(step)
        where = f"batch {step}" + (f" (epoch {epoch})" if epoch is not None else "")
        raise FloatingPointError(
            f"non-finite value at {where}: {cause}; last finite values: {last or 'none yet'}. "
            "Lower lr/mask_lr, raise sparsity_weight if masks saturate, use precision='32-true', "
            "or pass nonfinite='skip' to drop such batches."
        )


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
