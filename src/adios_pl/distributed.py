"""Gradient and buffer synchronisation for the two-player step under data parallelism.

DDP's reducer expects one backward that reaches every trainable parameter. The ADIOS step makes
several backwards per batch, each reaching one player, so :class:`~adios_pl.ADIOSModule` turns
DDP's own gradient hooks off and averages each player's gradients here, once per step, in one
flat collective.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adios_pl.backend import pl
from adios_pl.errors import ConfigurationError


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_strategy(strategy: pl.strategies.Strategy) -> None:
    """Refuse a strategy that shards parameters (FSDP, DeepSpeed, ModelParallel, ...).

    The averaging here needs every rank to hold every parameter whole, as single-device and DDP
    strategies do. FSDP and DeepSpeed hand each rank a shard of the parameters and reduce the
    gradients in their own hooks during the backward; averaging those shards again would train
    wrong without an error. ``ModelParallelStrategy`` shards what the module's ``configure_model``
    shards: nothing here, which is DDP under another name. So only single-device strategies and
    DDP (``ddp``, ``ddp_spawn``, ``ddp_notebook`` and their variants: subclasses of
    ``DDPStrategy``) are accepted.
    """
    strategies = pl.strategies
    whole = isinstance(strategy, (strategies.SingleDeviceStrategy, strategies.DDPStrategy))
    if whole and not isinstance(strategy, strategies.DeepSpeedStrategy):
        return
    raise ConfigurationError(
        'strategy: ADIOSModule trains with a single-device or DDP strategy (strategy="auto", "ddp", '
        f'"ddp_spawn", "ddp_notebook" and their variants); got {type(strategy).__name__}. Strategies that '
        "shard the parameters (FSDP, DeepSpeed, ModelParallel) are not supported: the two-player step "
        "averages each player's whole gradients itself"
    )


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
    """Average the gradients of ``params`` over all ranks in one flat all-reduce per dtype.

    Parameters without a gradient take part with zeros, so every rank sends the same layout.
    A no-op outside a multi-rank process group.
    """
    if not is_distributed() or not params:
        return
    pairs = []  # (gradient, its parameter)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        pairs.append((p.grad, p))
    world = dist.get_world_size()

    def average(flat: Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    for group in _by_dtype(pairs):
        _through_flat(group, average)


def broadcast_buffers(buffers: Iterable[Tensor], src: int = 0) -> None:
    """Copy floating-point buffers (BatchNorm statistics) from rank ``src`` to all ranks.

    DDP does this before every forward by default; with DDP's hooks off it happens here, once per
    step, so evaluation on every rank uses the same statistics.
    """
    if not is_distributed():
        return

    def from_src(flat: Tensor) -> None:
        dist.broadcast(flat, src=src)

    for group in _by_dtype((b, b) for b in buffers if b.is_floating_point()):
        _through_flat(group, from_src)


def _by_dtype(pairs: Iterable[tuple[Tensor, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
    """``(tensor, like)`` pairs grouped by the tensor's dtype."""
    groups: dict[torch.dtype, list[tuple[Tensor, Tensor]]] = {}
    for pair in pairs:
        groups.setdefault(pair[0].dtype, []).append(pair)
    return list(groups.values())


def _memory_order(like: Tensor) -> tuple[int, ...] | None:
    """The order of dimensions in which ``like``'s elements lie in memory when it is channels-last
    (2-D or 3-D images); None for the logical order."""
    if not like.is_contiguous():
        if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
            return (0, 2, 3, 1)
        if like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d):
            return (0, 2, 3, 4, 1)
    return None


def _through_flat(pairs: Sequence[tuple[Tensor, Tensor]], collective: Callable[[Tensor], None]) -> None:
    """Apply ``collective`` (in place) to the tensors of ``(tensor, like)`` pairs, all of one
    dtype, through one flat buffer.

    Each tensor enters the buffer in the memory order of its ``like`` (for a gradient, its
    parameter: the same on every rank, so every rank lays the buffer out alike). A tensor laid out
    that way, as gradients and buffers are, joins through a view, so channels-last weights are
    not copied on the way in, and all such tensors come back in one multi-tensor copy: a handful
    of kernel launches per step instead of one or two per tensor. Others are copied both ways.
    """
    ordered = [t if (order := _memory_order(like)) is None else t.permute(order) for t, like in pairs]
    views = [o.view(-1) if o.is_contiguous() else None for o in ordered]  # writable 1-D views
    flat = torch.cat([o.reshape(-1) if v is None else v for o, v in zip(ordered, views)])
    collective(flat)
    pieces = flat.split([o.numel() for o in ordered])
    direct = [(v, piece) for v, piece in zip(views, pieces) if v is not None]
    if direct:
        torch._foreach_copy_([v for v, _ in direct], [piece for _, piece in direct])
    for o, v, piece in zip(ordered, views, pieces):
        if v is None:  # joined through a copy: back through the (permuted) tensor itself
            o.copy_(piece.view(o.shape))


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's rows of ``tensor`` (the same shape on every rank), rank 0's first; outside a
    process group the tensor itself. No gradient flows back through the gather.

    Lightning's ``LightningModule.all_gather`` does the same through
    ``torch.distributed.nn.functional.all_gather``, which torch deprecates with a warning in every
    process; the plain collective has no such warning.
    """
    return torch.cat(_all_gather(tensor)) if is_distributed() else tensor


def _all_gather(tensor: Tensor) -> list[Tensor]:
    """Each rank's copy of ``tensor``, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


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
    stacked = torch.stack(_all_gather(tensor), dim=1)  # (n, W, ...)
    merged = stacked.reshape(-1, *tensor.shape[1:])
    return merged if dataset_length is None else merged[:dataset_length]
