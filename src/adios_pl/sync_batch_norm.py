"""Training-mode ``SyncBatchNorm`` of one or several views in one collective, without host synchronisation.

``nn.SyncBatchNorm`` gathers each rank's per-channel statistics, combines them into those of the
global batch and normalises with them. It makes one ``all_gather`` per call, so a batch of N
views (``masked_views="batched"``) that must keep per-view statistics pays N of them per layer,
and before combining it drops the ranks with an empty batch by boolean indexing, which reads a
count back to the host: every layer of every forward waits for the GPU. Here the views' local
statistics go into one tensor and one ``all_gather``; their input-gradient sums into one
``all_reduce`` in the backward; and no rank's batch is taken to be empty (the training step never
gives a rank an empty view), so nothing is read back.

On CUDA the per-view work is done by the kernels ``nn.SyncBatchNorm`` itself uses
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt`` and their
backward pair), called as it calls them. PyTorch has those kernels for CUDA only, so on the CPU
(gloo; ``nn.SyncBatchNorm`` refuses CPU tensors) :class:`_CpuKernels` computes the same quantities
with tensor operations, which is what lets two CPU processes test the collectives against one
process with plain batch norm on the whole batch (``tests/test_distributed.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def stats_dtype(x: Tensor, tensors: Sequence[Tensor | None]) -> torch.dtype:
    """The dtype of the per-channel statistics the batch-norm kernels keep: the input's
    accumulation type on CUDA; on the CPU the input's, or float32 when the parameters or running
    statistics have another dtype. (A wrong guess raises, it cannot corrupt: the ``out`` variants
    of the kernels check the dtype.)"""
    if x.device.type == "cuda":
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    mixed = any(t is not None and t.dtype != x.dtype for t in tensors)
    return torch.float32 if mixed else x.dtype


class _CudaKernels:
    """PyTorch's CUDA kernels for synchronised batch norm."""

    @staticmethod
    def stats(x: Tensor, eps: float, mean: Tensor, invstd: Tensor) -> None:
        torch.ops.aten.batch_norm_stats.out(x, eps, out0=mean, out1=invstd)

    @staticmethod
    def gather(x: Tensor, means: Tensor, invstds: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               momentum: float, eps: float, counts: Tensor) -> tuple[Tensor, Tensor]:
        return torch.batch_norm_gather_stats_with_counts(x, means, invstds, running_mean, running_var, momentum, eps, counts)

    @staticmethod
    def normalise(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, eps: float, out: Tensor) -> None:
        torch.ops.aten.batch_norm_elemt.out(x, weight, bias, mean, invstd, eps, out=out)

    @staticmethod
    def backward_reduce(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                        input_g: bool, weight_g: bool, bias_g: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.batch_norm_backward_reduce(grad, x, mean, invstd, weight, input_g, weight_g, bias_g)

    @staticmethod
    def backward_input(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                       sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor) -> Tensor:
        return torch.batch_norm_backward_elemt(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class _CpuKernels:
    """The same quantities as :class:`_CudaKernels`, from tensor operations, for the CPU."""

    @staticmethod
    def stats(x: Tensor, eps: float, mean: Tensor, invstd: Tensor) -> None:
        var, m = torch.var_mean(x.to(mean.dtype), dim=_reduce_dims(x), correction=0)
        mean.copy_(m)
        invstd.copy_((var + eps).rsqrt())

    @staticmethod
    def gather(x: Tensor, means: Tensor, invstds: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               momentum: float, eps: float, counts: Tensor) -> tuple[Tensor, Tensor]:
        n = counts[:, None]
        total = n.sum()
        mean = (n * means).sum(0) / total
        var = (n * (invstds.pow(-2) - eps + (means - mean).pow(2))).sum(0) / total  # each rank's biased variance, then the spread of the means
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(momentum * (var * total / (total - 1)).to(running_var.dtype))
        return mean, (var + eps).rsqrt()

    @staticmethod
    def normalise(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, eps: float, out: Tensor) -> None:
        shape = _channel_shape(x)
        y = (x - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        out.copy_(y)

    @staticmethod
    def backward_reduce(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                        input_g: bool, weight_g: bool, bias_g: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        dims, shape = _reduce_dims(x), _channel_shape(x)
        g = grad.to(mean.dtype)
        sum_dy = g.sum(dims)
        sum_dy_xmu = (g * (x.to(mean.dtype) - mean.view(shape))).sum(dims)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and weight_g else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and bias_g else None
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias

    @staticmethod
    def backward_input(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                       sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor) -> Tensor:
        shape = _channel_shape(x)
        total = counts.sum().to(mean.dtype)
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        xmu = x.to(mean.dtype) - mean.view(shape)
        g = grad.to(mean.dtype) - (sum_dy / total).view(shape) - xmu * (invstd.pow(2) * sum_dy_xmu / total).view(shape)
        return (g * scale.view(shape)).to(x.dtype)


def _kernels(x: Tensor) -> Any:
    return _CudaKernels if x.device.type == "cuda" else _CpuKernels


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class PerViewSyncBatchNorm(torch.autograd.Function):
    """Training-mode synchronised batch norm of ``views`` equal parts of the batch, each part with
    the statistics of that part on every rank of ``group``: what ``views`` calls of
    ``nn.SyncBatchNorm`` compute (running statistics updated once per part, in order), with one
    collective forward and one backward, and no host synchronisation.

    ``apply(x, weight, bias, running_mean, running_var, views, momentum, eps, group)``. The
    weight and bias gradients are local, as ``nn.SyncBatchNorm``'s: the data-parallel gradient
    averaging reduces them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
        running_var: Tensor | None, views: int, momentum: float, eps: float, group: Any,
    ) -> Tensor:
        """Normalise each of the ``views`` parts of ``x`` with its statistics over every rank (one gather)."""
        kernels = _kernels(x)
        x = x.contiguous(memory_format=_memory_format(x))
        channels = x.shape[1]
        parts = x.chunk(views)
        dtype = stats_dtype(x, (weight, bias, running_mean, running_var))
        # each view's (mean, invstd, count) in one row, the rows of all ranks in one gather
        local = torch.full((views, 2 * channels + 1), parts[0].numel() // channels, dtype=dtype, device=x.device)
        for v, part in enumerate(parts):
            kernels.stats(part, eps, local[v, :channels], local[v, channels : 2 * channels])
        world = dist.get_world_size(group)
        gathered = local.new_empty((world * views, 2 * channels + 1))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the first's older name)
        gather(gathered, local, group=group)
        by_view = gathered.view(world, views, -1).transpose(0, 1)  # (views, world, 2C + 1); each view's block made contiguous below
        means_all, invstds_all = by_view[..., :channels].contiguous(), by_view[..., channels : 2 * channels].contiguous()
        counts = by_view[..., 2 * channels].contiguous()
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        out = torch.empty_like(x)
        means, invstds = [], []
        for v, (part, into) in enumerate(zip(parts, out.chunk(views))):
            mean, invstd = kernels.gather(part, means_all[v], invstds_all[v], running_mean, running_var, momentum, eps, counts[v])
            kernels.normalise(part, weight, bias, mean, invstd, eps, into)
            means.append(mean)
            invstds.append(invstd)
        ctx.save_for_backward(x, weight, counts.to(torch.int32).unsqueeze(-1), *means, *invstds)
        ctx.views, ctx.group = views, group
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Gradients of ``x``, weight and bias; each view's reductions summed over every rank (one all-reduce)."""
        x, weight, counts, *saved = ctx.saved_tensors
        views, kernels = ctx.views, _kernels(x)
        means, invstds = saved[:views], saved[views:]
        grad = grad.contiguous(memory_format=_memory_format(x))
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        params = weight is not None and (needs_w or needs_b)  # the kernel reduces for both at once anyway
        parts = list(zip(grad.chunk(views), x.chunk(views)))
        reduced = [kernels.backward_reduce(g, part, means[v], invstds[v], weight, needs_x, params, params) for v, (g, part) in enumerate(parts)]
        grad_x = None
        if needs_x:  # every view's two sums over the ranks in one all-reduce
            sums = torch.stack([t for r in reduced for t in r[:2]])
            dist.all_reduce(sums, group=ctx.group)
            w = weight.to(means[0].dtype) if weight is not None and weight.dtype != means[0].dtype else weight
            grad_x = torch.cat([
                kernels.backward_input(g, part, means[v], invstds[v], w, sums[2 * v], sums[2 * v + 1], counts[v])
                for v, (g, part) in enumerate(parts)
            ])
        grad_w = grad_b = None
        if params:
            grad_w, grad_b = torch.stack([r[2] for r in reduced] + [r[3] for r in reduced]).unflatten(0, (2, views)).sum(1)
        return grad_x, grad_w if needs_w else None, grad_b if needs_b else None, None, None, None, None, None, None
