"""compile_optimizers and :func:`adios_pl.optim.compile_step`: the optimisers' updates as dynamo
traces them (graphs run eagerly, no code generated; ``graphs_per_part`` in conftest.py) against
the eager updates."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
import torch
import torch._dynamo

from adios_pl import ADIOSModule
from adios_pl.objectives import SimCLR
from adios_pl.optim import LARS, build_optimizer, compile_step

from conftest import make_loader, quiet_trainer


def _weights() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in ((8, 4), (4,), (3, 3, 2))]


def _train(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], compiled: bool, steps: int = 4) -> tuple[list[torch.Tensor], list[float]]:
    """``steps`` updates with random gradients and a learning rate that changes at every step;
    returns the weights and the closure's values that ``step`` returned."""
    weights = _weights()
    optimizer = make(weights)
    if compiled:
        compile_step(optimizer, {})
    g = torch.Generator().manual_seed(1)
    returned = []
    for i in range(steps):
        grads = [torch.randn(w.shape, generator=g, dtype=w.dtype) for w in weights]
        for w, grad in zip(weights, grads):
            w.grad = grad
        returned.append(optimizer.step(closure=lambda: float(i)))
        for group in optimizer.param_groups:
            group["lr"] *= 0.7
    return [w.detach() for w in weights], returned


OPTIMIZERS = {
    "lars": lambda ws: LARS(ws, lr=0.5, weight_decay=1e-2, foreach=True),
    "lars-loop": lambda ws: LARS(ws, lr=0.5, weight_decay=1e-2, foreach=False),
    "sgd": lambda ws: build_optimizer("sgd", ws, lr=0.5, weight_decay=1e-2),
    "adamw": lambda ws: build_optimizer("adamw", ws, lr=0.5, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compile_step_gives_the_eager_update_without_recompiling_for_a_new_rate(name: str, graphs_per_part: Counter[str]) -> None:
    """The compiled update equals the eager one over steps whose learning rate changes every
    time: two graphs (before and after the state exists; the rate becomes an input at its first
    change), no graph break, and the closure runs eagerly with its value returned. LARS and SGD
    run the same operations: bit for bit. Compiled, torch's AdamW computes its bias corrections
    ``1 - beta ** step`` from its step count as a float32 tensor where eager uses a Python float:
    measured here 9e-6 apart after 4 steps of about 1 (the first step's ``1 - 0.999`` carries a
    float32 relative error up to 6e-5), bounded at 1e-4."""
    eager, returned = _train(OPTIMIZERS[name], compiled=False)
    compiled, returned_compiled = _train(OPTIMIZERS[name], compiled=True)
    assert returned_compiled == returned == [0.0, 1.0, 2.0, 3.0]
    part = {"lars": "LARS", "lars-loop": "LARS", "sgd": "SGD", "adamw": "AdamW"}[name] + "_update"
    assert dict(graphs_per_part) == {part: 2}, dict(graphs_per_part)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for a, b in zip(compiled, eager):
        if name == "adamw":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        else:
            assert torch.equal(a, b)


def test_every_optimiser_gets_its_own_graphs(graphs_per_part: Counter[str]) -> None:
    """Dynamo keeps at most 8 graphs per code object and runs the function eagerly beyond: with
    one code object shared by all optimisers, the fifth LARS (two graphs each) would no longer be
    compiled. Each compiled update has its own."""
    for _ in range(6):
        _train(OPTIMIZERS["lars"], compiled=True, steps=2)
    assert dict(graphs_per_part) == {"LARS_update": 12}


def _model(**kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16),
                                num_masks=3, image_size=16, mask_width=8, lr=0.05, mask_lr=0.05, sparsity_weight=0.5, optimizer="lars")
    args.update(kw)
    return ADIOSModule(**args)


def _double_updates(model: ADIOSModule, steps: int, batches_per_epoch: int) -> torch.Tensor:
    """Every parameter's change over ``steps`` float64 steps (batches of 8), flattened."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = quiet_trainer(max_steps=steps, limit_train_batches=batches_per_epoch, precision="64-true")
    trainer.fit(model, make_loader(n=8 * steps, size=16, dtype=torch.float64))
    after = dict(model.named_parameters())
    return torch.cat([(after[k].detach() - v).flatten() for k, v in before.items()])


@pytest.mark.parametrize(
    ("settings", "graphs"),
    [({"warmup_epochs": 1}, 2), ({"schedule_interval": "epoch", "warmup_epochs": 1, "warmup_start_lr": 0.01}, 3)],
    ids=["rate-per-batch", "rate-per-epoch"],
)
def test_compiled_optimizers_train_as_the_eager_ones(settings: dict[str, Any], graphs: int, graphs_per_part: Counter[str]) -> None:
    """compile_optimizers in the training loop (LARS, both players, the warm-up moving the rates):
    the same updates as eager, bit for bit, with each optimiser's graphs: two where the rate
    changes at the second batch (a warm-up over the 2 batches of the first epoch); three with a
    per-epoch schedule, whose rate first changes at the second epoch (the third batch), after
    the graph with the momentum buffers has taken the first epoch's rate as a constant."""
    eager = _double_updates(_model(**settings), steps=4, batches_per_epoch=2)
    graphs_per_part.clear()
    compiled = _double_updates(_model(compile_optimizers=True, **settings), steps=4, batches_per_epoch=2)
    assert dict(graphs_per_part) == {"LARS_update": 2 * graphs}, dict(graphs_per_part)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch.equal(compiled, eager)
