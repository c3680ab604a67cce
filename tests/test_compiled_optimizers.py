"""compile_optimizers and :func:`adios_pl.optim.compile_step`: the optimisers' updates as dynamo
traces them (graphs run eagerly, no code generated; ``graphs_per_part`` in conftest.py) and as
Inductor compiles them (slow), against the eager updates."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
import torch
import torch._dynamo

from adios_pl import ADIOSModule
from adios_pl.checks import compile_options
from adios_pl.objectives import SimCLR
from adios_pl.optim import LARS, build_optimizer, compile_step

from conftest import make_loader, quiet_trainer


def _weights() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in ((8, 4), (4,), (3, 3, 2))]


def _train(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], options: dict[str, Any] | None,
           steps: int = 4) -> tuple[list[torch.Tensor], list[Any]]:
    """``steps`` updates with random gradients (the first weight's small: LARS clips its trust
    ratio) and a learning rate that changes at every step, compiled with ``options`` unless None;
    returns the weights and, per step, the closure's value that ``step`` returned and the rates
    the groups held after it."""
    weights = _weights()
    optimizer = make(weights)
    if options is not None:
        compile_step(optimizer, options)
    g = torch.Generator().manual_seed(1)
    seen = []
    for i in range(steps):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=g, dtype=w.dtype)
        weights[0].grad *= 1e-3
        seen.append((optimizer.step(closure=lambda: float(i)), [group["lr"] for group in optimizer.param_groups]))
        for group in optimizer.param_groups:
            group["lr"] *= 0.7
    return [w.detach() for w in weights], seen


OPTIMIZERS = {
    "lars": lambda ws: LARS(ws, lr=0.5, weight_decay=1e-2, foreach=True),
    "lars-loop": lambda ws: LARS(ws, lr=0.5, weight_decay=1e-2, foreach=False),
    "sgd": lambda ws: build_optimizer("sgd", ws, lr=0.5, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compile_step_gives_the_eager_update_without_recompiling_for_a_new_rate(name: str, graphs_per_part: Counter[str]) -> None:
    """The compiled update against the eager one over steps whose learning rate changes every
    time: two graphs (before and after the state exists; the rate is a tensor, not a constant),
    no graph break; the closure runs eagerly with its value returned, and the groups hold numbers
    again after each step. With the rate a tensor LARS multiplies where eager passes it as
    ``alpha``: measured here 2e-16 apart (one rounding), bounded at 1e-12."""
    eager, seen = _train(OPTIMIZERS[name], None)
    compiled, seen_compiled = _train(OPTIMIZERS[name], {})
    assert seen_compiled == seen and [value for value, _ in seen] == [0.0, 1.0, 2.0, 3.0]
    assert all(type(rate) is float for _, rates in seen_compiled for rate in rates)
    part = {"lars": "LARS", "lars-loop": "LARS", "sgd": "SGD"}[name] + "_update"
    assert dict(graphs_per_part) == {part: 2}, dict(graphs_per_part)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_every_optimiser_gets_its_own_graphs(graphs_per_part: Counter[str]) -> None:
    """Dynamo keeps at most 8 graphs per code object and runs the function eagerly beyond: with
    one code object shared by all optimisers, the fifth LARS (two graphs each) would no longer be
    compiled. Each compiled update has its own."""
    for _ in range(6):
        _train(OPTIMIZERS["lars"], {}, steps=2)
    assert dict(graphs_per_part) == {"LARS_update": 12}


def test_compile_step_refuses_adamw() -> None:
    with pytest.raises(ValueError, match="LARS and SGD"):
        compile_step(build_optimizer("adamw", _weights(), lr=0.1, weight_decay=0.0), {})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lars", "lars-loop", "sgd"])
def test_inductor_compiled_update_matches_eager(name: str) -> None:
    """The update compiled by Inductor (C++ on the CPU: fused, its own order of the arithmetic)
    in the options compile_optimizers gives it, against eager, float64. Measured here: 2e-16
    apart at most after 4 steps of about 1; bounded at 1e-12. With the rates handed to the
    compiler as numbers, Inductor (torch 2.14.1) kept LARS's first changed rate as ``alpha`` for
    good and the runs ended 0.75 apart."""
    torch._dynamo.reset()
    eager, _ = _train(OPTIMIZERS[name], None)
    compiled, _ = _train(OPTIMIZERS[name], {**compile_options("reduce-overhead"), "triton.cudagraphs": False})
    torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


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
    "settings", [{"warmup_epochs": 1}, {"schedule_interval": "epoch", "warmup_epochs": 1, "warmup_start_lr": 0.01}],
    ids=["rate-per-batch", "rate-per-epoch"],
)
def test_compiled_optimizers_train_as_the_eager_ones(settings: dict[str, Any], graphs_per_part: Counter[str]) -> None:
    """compile_optimizers in the training loop (LARS, both players, the warm-up moving the rates
    per batch or per epoch): the updates of eager training, two graphs per optimiser, no graph
    break. Measured here: the updates (up to 0.2) 3e-16 apart (LARS multiplies by a tensor rate
    where eager passes a number as ``alpha``); bounded at 1e-13."""
    eager = _double_updates(_model(**settings), steps=4, batches_per_epoch=2)
    graphs_per_part.clear()
    compiled = _double_updates(_model(compile_optimizers=True, **settings), steps=4, batches_per_epoch=2)
    assert dict(graphs_per_part) == {"LARS_update": 4}, dict(graphs_per_part)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-13)


def test_a_run_resumes_with_or_without_compiled_optimizers(tmp_path: Any, graphs_per_part: Counter[str]) -> None:
    """Checkpoints hold the rates as numbers either way: an eager run stopped after its first
    epoch and resumed with compile_optimizers, and a compiled run resumed eagerly, both end where
    an uninterrupted eager run does (LARS, float64, per-batch warm-up, 2 epochs of 2 batches; the
    tolerance of the loop test above; measured 2.2e-16). The models are made float64 before the
    fit: under ``precision="64-true"`` Lightning 2.6.6 loads a checkpoint into a float32 model
    before converting it, which rounds the weights (an eager resume then ends 6e-8 away)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from conftest import StopAt

    def fit(model: ADIOSModule, callbacks: list[Any], ckpt_path: str | None = None) -> torch.Tensor:
        trainer = quiet_trainer(max_epochs=2, precision="64-true", callbacks=callbacks, enable_checkpointing=bool(callbacks))
        trainer.fit(model, make_loader(n=16, size=16, dtype=torch.float64), ckpt_path=ckpt_path)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    straight = fit(_model(warmup_epochs=1).double(), [])
    for first, then in ((False, True), (True, False)):
        folder = tmp_path / f"first_{first}"
        fit(_model(warmup_epochs=1, compile_optimizers=first).double(), [ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0), StopAt(2)])
        saved = torch.load(folder / "last.ckpt", weights_only=False)
        assert saved["global_step"] == 2
        assert all(type(group["lr"]) is float for state in saved["optimizer_states"] for group in state["param_groups"])
        resumed = fit(_model(warmup_epochs=1, compile_optimizers=then).double(), [], ckpt_path=str(folder / "last.ckpt"))
        torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-13)
    # per optimiser: two in the compiled first half; one in the compiled second, whose buffers exist
    assert graphs_per_part["LARS_update"] == 6
