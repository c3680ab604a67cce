"""Gradient and buffer synchronisation for the two-player step under data parallelism.

DDP's reducer expects one backward that reaches every trainable parameter. The ADIOS step makes
several backwards per batch, each reaching one player, so :class:`~adios_pl.ADIOSModule` turns
DDP's own gradient hooks off and averages each player's gradients here, once per step, in one
flat collective.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def disable_ddp_grad_sync(model: nn.Module | None) -> bool:
    """Stop a ``DistributedDataParallel`` wrapper from reducing gradients itself.

    Sets ``require_backward_grad_sync = False`` for good (what ``no_sync()`` does for one block):
    the reducer then never expects a backward, and its "parameters that were not used in
    producing the loss" check never fires. Returns whether ``model`` is such a wrapper.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = False
        return True
    return False


def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks in one flat all-reduce.

    Parameters without a gradient take part with zeros, so every rank sends the same layout.
    A no-op outside a multi-rank process group.
    """
    if not is_distributed() or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)  # type: ignore[union-attr]
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n


def broadcast_buffers(buffers: Iterable[Tensor], src: int = 0) -> None:
    """Copy floating-point buffers (BatchNorm statistics) from rank ``src`` to all ranks.

    DDP does this before every forward by default; with DDP's hooks off it happens here, once per
    step, so evaluation on every rank uses the same statistics.
    """
    if not is_distributed():
        return
    tensors = [b for b in buffers if b.is_floating_point()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def gather_in_order(tensor: Tensor, dataset_length: int | None) -> Tensor:
    """Rows of every rank, back in dataset order, without the distributed sampler's padding.

    An unshuffled ``DistributedSampler`` gives rank ``r`` the dataset indices ``r, r + W, ...``
    and pads the last round with indices from the start, so every rank has the same count.
    Gathering ``(W, n, ...)`` and interleaving restores ``0, 1, 2, ...``; the first
    ``dataset_length`` rows are the dataset exactly once. Outside a process group the tensor is
    returned as is (cut to ``dataset_length`` when given).
    """
    if not is_distributed():
        return tensor if dataset_length is None else tensor[:dataset_length]
    world = dist.get_world_size()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    stacked = torch.stack(parts, dim=1)  # (n, W, ...)
    merged = stacked.reshape(-1, *tensor.shape[1:])
    return merged if dataset_length is None else merged[:dataset_length]
