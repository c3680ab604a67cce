"""Synchronised batch norm of several views on two CPU processes (gloo) against plain batch norm of
each view's whole batch in one process: outputs, input and parameter gradients, running
statistics; with one collective per direction for all views."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adios_pl.batched_views import batch_norm_per_view, synchronised_batch_norm

from conftest import free_port

WORLD, VIEWS, PER_RANK, CHANNELS = 2, 3, 4, 5


def _global_data(shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each view's images on all ranks, the loss weights, and the layer's weight and bias."""
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(WORLD * PER_RANK, *shape, generator=g, dtype=torch.float64) * 2 + 0.5 for _ in range(VIEWS)]
    loss_weights = [torch.randn(WORLD * PER_RANK, *shape, generator=g, dtype=torch.float64) for _ in range(VIEWS)]
    return views, loss_weights, torch.rand(CHANNELS, generator=g, dtype=torch.float64) + 0.5, torch.randn(CHANNELS, generator=g, dtype=torch.float64)


def _reference(shape: tuple[int, ...], views: int) -> dict[str, Any]:
    """One process, plain batch norm, one call per view on all ranks' images of it."""
    data, loss_weights, weight, bias = _global_data(shape)
    data, loss_weights = data[:views], loss_weights[:views]
    xs = [x.clone().requires_grad_() for x in data]
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    running_mean, running_var = torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64)
    outs = [F.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.1, eps=1e-5) for x in xs]
    sum((o * lw).sum() for o, lw in zip(outs, loss_weights)).backward()
    return {"out": [o.detach() for o in outs], "grad_x": [x.grad for x in xs], "grad_w": w.grad, "grad_b": b.grad,
            "running_mean": running_mean, "running_var": running_var}


def _rank(rank: int, port: int, shape: tuple[int, ...], views: int, channels_last: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = {"all_gather": 0, "all_reduce": 0}
    originals = {}
    for name, kind in (("all_gather_single", "all_gather"), ("all_gather_into_tensor", "all_gather"), ("all_reduce", "all_reduce")):
        original = getattr(dist, name, None)

        def counted(*args: Any, _original: Any = original, _kind: str = kind, **kwargs: Any) -> Any:
            calls[_kind] += 1
            return _original(*args, **kwargs)

        if original is not None:
            originals[name] = original
            setattr(dist, name, counted)
    try:
        _record(rank, shape, views, channels_last, out, calls)
    finally:  # the process runs other tests' jobs after this one
        for name, original in originals.items():
            setattr(dist, name, original)


def _record(rank: int, shape: tuple[int, ...], views: int, channels_last: bool, out: str, calls: dict[str, int]) -> None:
    data, loss_weights, weight, bias = _global_data(shape)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    x = torch.cat([d[mine] for d in data[:views]])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    layer = nn.SyncBatchNorm(CHANNELS, momentum=0.1).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    block = batch_norm_per_view([layer], views) if views > 1 else synchronised_batch_norm([layer])
    with block:
        y = layer(x)
    forward_calls = dict(calls)
    (y * torch.cat([lw[mine] for lw in loss_weights[:views]])).sum().backward()
    dist.destroy_process_group()
    torch.save({
        "out": y.detach(), "grad_x": x.grad, "grad_w": layer.weight.grad, "grad_b": layer.bias.grad,
        "running_mean": layer.running_mean, "running_var": layer.running_var, "tracked": int(layer.num_batches_tracked),
        "forward_calls": forward_calls, "calls": calls, "channels_last": y.is_contiguous(memory_format=torch.channels_last),
        "restored": "forward" not in layer.__dict__,
    }, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("shape, views, channels_last", [
    ((CHANNELS, 3, 3), VIEWS, False), ((CHANNELS, 3, 3), VIEWS, True), ((CHANNELS,), VIEWS, False), ((CHANNELS, 3, 3), 1, False),
], ids=["nchw", "channels_last", "1d", "one_view"])
def test_two_processes_equal_plain_batch_norm_of_the_whole_batch(tmp_path: Path, shape: tuple[int, ...], views: int, channels_last: bool,
                                                                  two_processes: Any) -> None:
    two_processes.run(_rank, free_port(), shape, views, channels_last, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _reference(shape, views)
    for r, got in enumerate(ranks):
        mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
        for v in range(views):
            part = slice(v * PER_RANK, (v + 1) * PER_RANK)
            torch.testing.assert_close(got["out"][part], ref["out"][v][mine], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got["grad_x"][part], ref["grad_x"][v][mine], rtol=1e-10, atol=1e-10)
        for k in ("running_mean", "running_var"):  # updated once per view, in order, with the global statistics
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
        assert got["tracked"] == views
        assert got["restored"], "the layer's forward was not restored"
        assert got["channels_last"] == channels_last
        # one gather forward, one reduction backward, whatever the number of views
        assert got["forward_calls"] == {"all_gather": 1, "all_reduce": 0}, got["forward_calls"]
        assert got["calls"] == {"all_gather": 1, "all_reduce": 1}, got["calls"]
    # the parameters' gradients are local, as nn.SyncBatchNorm's; their sum over ranks is the whole batch's
    for k in ("grad_w", "grad_b"):
        torch.testing.assert_close(sum(got[k] for got in ranks), ref[k], rtol=1e-10, atol=1e-10)
