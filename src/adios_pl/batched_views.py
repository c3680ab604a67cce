"""Several views through the encoder as one batch, with batch-norm statistics kept per view.

ADIOS encodes N masked copies of each batch. One forward of the N copies stacked into a batch of
``N * B`` images launches most of a network's kernels once instead of N times, which is what a
GPU step that is limited by kernel launches needs. Batch norm is the one common layer whose output depends
on the rest of the batch, so while the views go through together every batch-norm layer
normalises each view's ``B`` images with their own statistics and updates its running statistics
once per view, in order: the outputs are those of N separate forwards, up to the rounding of the
other layers' larger-batch kernels.

Plain batch norm (an ``nn.BatchNorm*`` layer in training mode with a momentum, on the CPU or
CUDA) with four views or more (:data:`MIN_VIEWS_FOR_FUNCTION`) goes through one autograd
function that runs the layer's native kernels once per view and writes each view's output into
its slice of one tensor, so no ``cat`` joins the views in the forward. ``SyncBatchNorm`` across processes goes through
:class:`~adios_pl.sync_batch_norm.PerViewSyncBatchNorm`: one collective for all views instead of
one per view, and no host synchronisation (:func:`synchronised_batch_norm` gives the training
step's single-view forwards the same). Under ``torch.compile`` plain batch norm is written as
one reduction over a ``(views, batch, ...)`` view of the input (:func:`grouped_batch_norm`): the
compiler then makes one statistics kernel per layer rather than one per view, and has no join to
make. Other layers (cumulative averages, evaluation mode) run their own forward once per view
and the outputs are joined with ``cat``, as plain batch norm with fewer views does.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adios_pl.errors import ConfigurationError
from adios_pl.objectives.base import ViewOutput
from adios_pl.sync_batch_norm import PerViewSyncBatchNorm, stats_dtype

ViewForward = Callable[[nn.Module, Tensor], ViewOutput]


class _PerViewBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of ``views`` equal parts of the batch, each with its own statistics.

    The same kernels as one ``F.batch_norm`` per part, in order (running statistics included),
    but each part is normalised straight into its slice of one output (no ``cat`` in the
    forward), and the parameters' gradients are one sum over the parts instead of an addition
    per part and parameter. The backward is made of differentiable operations
    (``native_batch_norm_backward`` has its own derivative), so second derivatives are those of
    the parts' own batch norms.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
        running_var: Tensor | None, views: int, momentum: float, eps: float,
    ) -> Tensor:
        out = torch.empty_like(x)
        # each part's mean and inverse deviation, as the kernel keeps them for the backward, in one buffer
        stats = x.new_empty((2, views, x.shape[1]), dtype=stats_dtype(x, (weight, bias, running_mean, running_var)))
        for part, into, mean, invstd in zip(x.chunk(views), out.chunk(views), stats[0], stats[1]):
            torch.native_batch_norm(part, weight, bias, running_mean, running_var, True, momentum, eps, out=(into, mean, invstd))
        ctx.save_for_backward(x, weight, stats)
        ctx.views, ctx.eps = views, eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, stats = ctx.saved_tensors
        views = ctx.views
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        params = weight is not None and (needs_w or needs_b)  # the kernel reduces for both at once anyway
        mask = [bool(needs_x), params, params]
        backward = torch.ops.aten.native_batch_norm_backward.default
        parts = [
            backward(g, part, weight, None, None, mean, invstd, True, ctx.eps, mask)
            for g, part, mean, invstd in zip(grad.chunk(views), x.chunk(views), stats[0], stats[1])
        ]
        # (the backward has no out= kernel of its own: its out variant copies, as cat does, once per part)
        grad_x = torch.cat([p[0] for p in parts]) if needs_x else None
        grad_w = grad_b = None
        if params:  # both parameters' sums over the views in one reduction
            grad_w, grad_b = torch.stack([p[1] for p in parts] + [p[2] for p in parts]).unflatten(0, (2, views)).sum(1)
        return grad_x, grad_w if needs_w else None, grad_b if needs_b else None, None, None, None, None, None


def grouped_batch_norm(layer: _BatchNorm, x: Tensor, views: int) -> Tensor:
    """Training-mode batch norm of each of ``views`` equal parts of ``x`` along the batch, with the
    part's own statistics, as one reduction over ``x`` seen as ``(views, batch, channels, ...)``.

    What a compiler should see: its kernels then compute the statistics of every view at once,
    where a forward per view gives it one reduction per view and a join. The output and the
    gradients are those of ``layer`` applied to each part (up to rounding; statistics in float32
    for half-precision inputs, as PyTorch's kernels keep them), and the running statistics and
    ``num_batches_tracked`` advance as in ``views`` forwards of the layer, one after the other.
    The layer must be in training mode with a momentum (not a cumulative average).
    """
    if layer.momentum is None or not layer.training:
        raise ValueError("grouped_batch_norm needs a layer in training mode with a momentum (not None)")
    parts = x.unflatten(0, (views, -1))
    per_channel = parts[0].numel() // parts.shape[2]  # values behind each statistic of one view
    if per_channel <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(parts[0].shape)}")
    compute = parts.float() if parts.dtype in (torch.float16, torch.bfloat16) else parts
    var, mean = torch.var_mean(compute, dim=[1, *range(3, parts.dim())], correction=0, keepdim=True)
    out = (compute - mean) * torch.rsqrt(var + layer.eps)
    if layer.weight is not None and layer.bias is not None:
        shape = [1, 1, -1] + [1] * (parts.dim() - 3)
        out = out * layer.weight.view(shape) + layer.bias.view(shape)
    if layer.track_running_stats and layer.running_mean is not None and layer.running_var is not None:
        # the views' updates one after the other, r <- (1 - m) r + m s_v, in closed form:
        # (1 - m)^V r + sum_v m (1 - m)^(V - 1 - v) s_v (a product and a sum, no matrix product:
        # that could round in TF32)
        momentum = layer.momentum
        weights = torch.tensor([momentum * (1 - momentum) ** (views - 1 - v) for v in range(views)], dtype=mean.dtype, device=x.device)
        with torch.no_grad():
            for running, stat in ((layer.running_mean, mean), (layer.running_var, var * (per_channel / (per_channel - 1)))):
                running.mul_((1 - momentum) ** views).add_((weights[:, None] * stat.view(views, -1)).sum(0).to(running.dtype))
            if layer.num_batches_tracked is not None:
                layer.num_batches_tracked.add_(views)
    return out.to(x.dtype).flatten(0, 1)


#: Whether plain batch-norm layers go through :class:`_PerViewBatchNorm` (under ``torch.compile``,
#: :func:`grouped_batch_norm`) while views are batched (True), or through their own forward once
#: per view, joined by ``cat`` (False). Both compute the same. A switch for benchmarks
#: (``benchmarks/train_speed.py --per-view-bn``).
PER_VIEW_FUNCTION = True

#: The function saves launches that grow with the views (the forward's join, the per-view
#: additions of the parameters' gradients and of ``num_batches_tracked``) and costs host time
#: in Python that the per-view forwards do not. ``benchmarks/bn_host_time.py`` (tiny tensors, so
#: host time only; two runs on a CPU): one layer's forward and backward take about 110 µs more
#: with the function at two views, 60 more at three, the same within 10 µs from four on. So it
#: serves four views or more, where it costs no host time and launches fewer kernels. End to end
#: on an H100 (batched exact ADIOS, 5 views) it was no faster than the per-view forwards and
#: ``cat`` (2,764 against 2,862 images/s, inside the spread between single runs).
MIN_VIEWS_FOR_FUNCTION = 4


def _per_view_form(layer: _BatchNorm) -> bool:
    """Whether the per-view forms here compute what the layer's own forward would, part by part:
    plain batch norm or ``SyncBatchNorm`` (their classes' forward) in training mode with a fixed
    momentum, with both affine parameters or neither."""
    return (
        type(layer).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward) and layer.training
        and layer.momentum is not None and (layer.weight is None) == (layer.bias is None)
    )


def _fast_path(layer: _BatchNorm, x: Tensor) -> bool:
    """Whether the autograd functions here serve the layer: a per-view form, eagerly, on the CPU
    or CUDA (they run PyTorch's own kernels)."""
    return _per_view_form(layer) and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()


def _groupable(layer: _BatchNorm) -> bool:
    """Whether :func:`grouped_batch_norm` serves the layer: a per-view form under ``torch.compile``
    (plain batch norm, or ``SyncBatchNorm`` where it does not synchronise)."""
    return torch.compiler.is_compiling() and _per_view_form(layer)


def _sync_group(layer: _BatchNorm) -> Any:
    """The process group over whose batches a ``SyncBatchNorm`` layer normalises in training; None
    where it normalises like plain batch norm (not synchronised, or one process)."""
    if not isinstance(layer, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = layer.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _PerViewForward:
    """A batch-norm layer's forward applied to each of ``views`` equal parts of its input.

    Holds its layer weakly and is cached per layer and count (:func:`_per_view_forward`), so that
    installing it again is the same object: ``torch.compile`` guards on a module's ``forward``.
    """

    def __init__(self, layer: _BatchNorm, views: int) -> None:
        self.layer, self.views = weakref.ref(layer), views

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer()
        assert layer is not None, "called after its layer was freed"
        forward = type(layer).forward
        group = _sync_group(layer)
        if group is None and self.views > 1 and PER_VIEW_FUNCTION and _groupable(layer):
            layer._check_input_dim(x)
            return grouped_batch_norm(layer, x, self.views)
        plain = group is None and not (PER_VIEW_FUNCTION and self.views >= MIN_VIEWS_FOR_FUNCTION)
        if not _fast_path(layer, x) or plain:
            return forward(layer, x) if self.views == 1 else torch.cat([forward(layer, part) for part in x.chunk(self.views)])
        layer._check_input_dim(x)
        tracked = layer.track_running_stats
        if tracked and layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(self.views)  # once per part, as in the parts' own forwards
        running = (layer.running_mean, layer.running_var) if tracked else (None, None)
        apply: Any
        if group is not None:
            apply = PerViewSyncBatchNorm.apply
            return apply(x, layer.weight, layer.bias, *running, self.views, layer.momentum, layer.eps, group)
        apply = _PerViewBatchNorm.apply
        return apply(x, layer.weight, layer.bias, *running, self.views, layer.momentum, layer.eps)

    def __deepcopy__(self, memo: dict[int, object]) -> object:
        """A layer copied while patched gets its class's plain forward, bound to the copy."""
        layer = self.layer()
        if layer is None:
            return self
        copied = memo.get(id(layer))
        return type(layer).forward.__get__(copied if copied is not None else layer)


_CACHE: weakref.WeakKeyDictionary[_BatchNorm, dict[int, _PerViewForward]] = weakref.WeakKeyDictionary()


def _per_view_forward(layer: _BatchNorm, views: int) -> _PerViewForward:
    cached = _CACHE.setdefault(layer, {})
    if views not in cached:
        cached[views] = _PerViewForward(layer, views)
    return cached[views]


def _plain_forward(layer: _BatchNorm) -> bool:
    """Whether the layer runs its class's forward (not a replacement installed on the instance),
    or one installed here (an enclosing block's)."""
    own = layer.__dict__.get("forward")
    return own is None or isinstance(own, _PerViewForward) or (
        getattr(own, "__func__", None) is type(layer).forward and getattr(own, "__self__", None) is layer
    )


@contextlib.contextmanager
def batch_norm_per_view(modules: Sequence[nn.Module], views: int) -> Iterator[None]:
    """Within the block, every batch-norm layer of ``modules`` (``SyncBatchNorm`` included) treats
    its input as ``views`` equal parts along the batch and normalises each with its own statistics.

    Running statistics, ``num_batches_tracked`` and the cross-process statistics of
    ``SyncBatchNorm`` advance exactly as in ``views`` separate forwards of the layer. A layer
    whose ``forward`` was replaced on the instance is rejected (its replacement would be
    bypassed). The layers are restored on exit.
    """
    layers: dict[int, _BatchNorm] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                if not _plain_forward(layer):
                    raise ConfigurationError(
                        f"{type(layer).__name__} layer has its own forward on the instance; masked_views=\"batched\" "
                        'replaces it while the views go through. Use masked_views="sequential".'
                    )
                layers.setdefault(id(layer), layer)
    with _installed(layers.values(), views):
        yield


@contextlib.contextmanager
def synchronised_batch_norm(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, every ``SyncBatchNorm`` layer of ``modules`` that synchronises (training,
    several processes) does so through :class:`~adios_pl.sync_batch_norm.PerViewSyncBatchNorm`:
    the same statistics as its own forward, without reading a count back to the host at every
    call, and on CPU processes too. Layers with a ``forward`` of their own on the instance are
    left to it. Nested :func:`batch_norm_per_view` blocks take over the layers inside them.
    Without several processes no layer synchronises, and the block does nothing."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    layers = {
        id(layer): layer for module in modules for layer in module.modules()
        if isinstance(layer, nn.SyncBatchNorm) and _plain_forward(layer)
    }
    with _installed(layers.values(), 1):
        yield


@contextlib.contextmanager
def _installed(layers: Iterable[_BatchNorm], views: int) -> Iterator[None]:
    patched: list[tuple[_BatchNorm, Any]] = []
    try:
        for layer in layers:
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = _per_view_forward(layer, views)  # type: ignore[method-assign, assignment]
        yield
    finally:
        for layer, own in reversed(patched):
            if own is None:
                del layer.forward
            else:
                layer.forward = own  # type: ignore[method-assign, assignment]


def forward_views(
    forward: ViewForward, encoder: nn.Module, views: Sequence[Tensor], modules: Sequence[nn.Module],
) -> list[ViewOutput]:
    """``[forward(encoder, v) for v in views]`` computed as one forward of the stacked views.

    Args:
        forward: What one view goes through (an objective: ``forward(encoder, images)`` returns
            a dict of tensors whose first dimension is the batch).
        encoder: Passed on to ``forward``.
        views: Image batches of the same shape.
        modules: Whose batch-norm layers keep per-view statistics (the encoder and the objective,
            with any momentum copies in it).
    """
    if len(views) == 1:
        return [forward(encoder, views[0])]
    batch = views[0].shape[0]
    with batch_norm_per_view(modules, len(views)):
        outputs = forward(encoder, torch.cat(list(views)))
    for name, value in outputs.items():
        if value.dim() == 0 or value.shape[0] != batch * len(views):
            raise ConfigurationError(
                f'masked_views="batched" needs every output of the objective to have the batch as its first '
                f"dimension; {name!r} has shape {tuple(value.shape)} for {len(views)} views of {batch} images. "
                'Use masked_views="sequential" with this objective.'
            )
    parts = {name: value.chunk(len(views)) for name, value in outputs.items()}
    return [{name: chunks[i] for name, chunks in parts.items()} for i in range(len(views))]
