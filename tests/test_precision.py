"""Update modes and the GPU-path options, checked on the CPU against the default step."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo
from pytorch_lightning.plugins.precision import MixedPrecision

from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskQuality, OnlineKNN, OnlineLinearProbe
from adios_pl.checks import compile_options
from adios_pl.data import ShapesDataModule
from adios_pl.objectives import BYOL, SimCLR, SimSiam

from conftest import make_loader, quiet_trainer


def _model(**kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16),
                                num_masks=3, image_size=16, mask_width=8, warmup_epochs=0, lr=0.05, mask_lr=0.05, sparsity_weight=0.5)
    args.update(kw)
    return ADIOSModule(**args)


def _updates(model: ADIOSModule, steps: int = 1, **trainer: Any) -> dict[str, torch.Tensor]:
    # parameters only: BatchNorm statistics legitimately differ with the number of forwards
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    quiet_trainer(max_steps=steps, **trainer).fit(model, make_loader(n=8 * steps, size=16))
    after = dict(model.named_parameters())
    parts: dict[str, list[torch.Tensor]] = {"encoder": [], "mask_generator": []}
    for k, v in before.items():
        for part in parts:
            if k.startswith(part + "."):
                parts[part].append((after[k].detach().float() - v.float()).flatten())
    return {k: torch.cat(v) for k, v in parts.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _encoder_forwards(model: ADIOSModule) -> int:
    calls = [0]
    model.encoder.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    quiet_trainer(max_steps=1).fit(model, make_loader(n=8, size=16))
    return calls[0]


def test_simultaneous_update_saves_the_mask_step_passes() -> None:
    # N=3: alternating encodes clean + 3 masked views in each player (8); simultaneous once (4)
    assert _encoder_forwards(_model()) == 8
    assert _encoder_forwards(_model(update="simultaneous")) == 4


def test_simultaneous_equals_alternating_when_the_encoder_barely_moves() -> None:
    # The encoder's update is the same computation in both modes: the reversed mask gradient must
    # not leak into it. The mask generator's differs only through the encoder it is differentiated
    # through (before or after the encoder's step): equal when the encoder barely moves, not otherwise.
    alternating = _updates(_model(lr=1e-6))
    simultaneous = _updates(_model(lr=1e-6, update="simultaneous"))
    assert _rel(simultaneous["mask_generator"], alternating["mask_generator"]) < 1e-3
    moving_alt = _updates(_model())
    moving_sim = _updates(_model(update="simultaneous"))
    assert _rel(moving_sim["encoder"], moving_alt["encoder"]) < 1e-6, "the simultaneous rule changed the encoder's update"
    assert _rel(moving_sim["mask_generator"], moving_alt["mask_generator"]) > 1e-3, "the simultaneous rule had no effect"
    assert torch.isfinite(moving_sim["mask_generator"]).all() and moving_sim["mask_generator"].norm() > 0


def test_channels_last_gives_the_same_step() -> None:
    plain = _updates(_model())
    last = _updates(_model(channels_last=True))
    for part in plain:
        assert _rel(last[part], plain[part]) < 1e-4, part


# At initialisation the mask generator's gradient is small and noise-like, and reduced
# precision perturbs it a lot (about 0.4 relative with fp16, 0.6 with bf16, on every U-Net layer
# alike); the encoder's within about 0.1. A scaling bug would be off by 2**12.
TOLERANCE = {"encoder": 0.25, "mask_generator": 0.8}


def test_bf16_mixed_on_cpu_is_close_to_fp32() -> None:
    fp32 = _updates(_model())
    bf16 = _updates(_model(), precision="bf16-mixed")
    for part in fp32:
        assert _rel(bf16[part], fp32[part]) < TOLERANCE[part], part


def test_one_grad_scaler_serves_both_optimisers() -> None:
    # fp16 autocast with a GradScaler of scale 2**12: if either optimiser stepped on scaled
    # gradients (or one was unscaled twice) its update would be off by that factor.
    fp32 = _updates(_model(), steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    fp16 = _updates(_model(), steps=2, plugins=[plugin])
    for part in fp32:
        assert _rel(fp16[part], fp32[part]) < TOLERANCE[part], part
        cosine = torch.nn.functional.cosine_similarity(fp16[part], fp32[part], dim=0)
        assert cosine > 0.8, (part, float(cosine))
    assert scaler.get_scale() >= 2.0**12  # no overflow: no step was skipped


def test_compile_options_keep_parameter_names() -> None:
    model = _model(compile_encoder=True, compile_mask_generator="reduce-overhead")
    names = set(model.state_dict())
    model.configure_model()
    assert set(model.state_dict()) == names
    assert model.encoder._compiled_call_impl is not None and model.mask_generator._compiled_call_impl is not None
    random_masks = _model(mask_type="random_patch", compile_mask_generator=True)
    random_masks.configure_model()  # nothing to learn, nothing compiled
    assert random_masks.mask_generator._compiled_call_impl is None and random_masks.encoder._compiled_call_impl is None


def test_compiled_parts_get_their_mode_with_mix_order_reduction_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each compiled part gets its mode's Inductor options with mix-order reduction off (torch 2.11
    fails on the batched encoder's batch norm with it on a GPU, pytorch/pytorch#177419)."""
    from torch._inductor import config

    if not hasattr(config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    calls: list[tuple[torch.nn.Module, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: calls.append((self, {**kwargs, "args": args})))
    model = _model(compile_encoder=True, compile_mask_generator="reduce-overhead")
    model.configure_model()
    assert calls == [
        (model.encoder, {"options": {"triton.mix_order_reduction": False}, "args": ()}),
        (model.mask_generator, {"options": {"triton.cudagraphs": True, "triton.mix_order_reduction": False}, "args": ()}),
    ]


def test_compile_objective_compiles_its_forward_and_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_objective compiles the objective's forward in place (parameter names unchanged) and
    its three losses, each with its mode's options and mix-order reduction off."""
    calls: list[tuple[Any, dict]] = []

    def record(fn: Any, **kwargs: Any) -> Any:
        calls.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    model = _model(compile_objective="reduce-overhead")
    names = set(model.state_dict())
    model.configure_model()
    assert set(model.state_dict()) == names
    options = {"options": compile_options("reduce-overhead")}
    objective = model.objective
    assert calls == [(objective._call_impl, options), (objective.loss, options), (objective.loss_both, options), (objective.terms_loss, options)]
    calls.clear()
    model.configure_model()  # once only
    assert calls == [] and _model().objective._compiled_call_impl is None


@pytest.mark.parametrize("graphs", [False, True], ids=["eager-kernels", "cuda-graphs"])
def test_what_leaves_the_step_is_copied_out_of_the_objectives_cuda_graphs(graphs: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the objective replaying as CUDA graphs (simulated: the decision is made as on a GPU),
    the encoder loss and the features that the step hands to logs and callbacks are copies, not
    the graphs' outputs, which the next replay overwrites; otherwise they are the outputs
    themselves (no copy)."""
    import adios_pl.module

    monkeypatch.setattr(adios_pl.module, "replays_as_cuda_graphs", lambda setting, device: graphs and setting == "reduce-overhead")
    model = _model(masked_views="batched", compile_objective="reduce-overhead")
    monkeypatch.setattr(model, "configure_model", lambda: None)  # runs eagerly: only what is copied is checked
    made: list[torch.Tensor] = []  # what the compiled parts would return: the objective's outputs, its losses
    plain_loss, plain_forward = model._loss, model.objective.forward

    def loss(name: str) -> Any:
        def call(*args: Any) -> torch.Tensor:
            made.append(plain_loss(name)(*args))
            return made[-1]
        return call

    def forward(*args: Any) -> dict[str, torch.Tensor]:
        out = plain_forward(*args)
        made.extend(out.values())
        return out

    monkeypatch.setattr(model, "_loss", loss)
    monkeypatch.setattr(model.objective, "forward", forward)
    outputs: list[Any] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, out: Any, batch: Any, batch_idx: int) -> None:
            outputs.append(out)

    quiet_trainer(max_steps=1, callbacks=[Keep()]).fit(model, make_loader(n=8, size=16))
    storages = {t.untyped_storage().data_ptr() for t in made}
    left = [outputs[0]["loss"], outputs[0]["features"]]
    assert [t.untyped_storage().data_ptr() in storages for t in left] == [not graphs, not graphs]


def _double_updates(model: ADIOSModule, steps: int = 2) -> torch.Tensor:
    """Every parameter's change over ``steps`` float64 steps, flattened."""
    before = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    quiet_trainer(max_steps=steps, precision="64-true").fit(model, make_loader(n=8 * steps, size=16, dtype=torch.float64))
    after = dict(model.named_parameters())
    return torch.cat([(after[k].detach() - v).flatten() for k, v in before.items()])


@pytest.mark.parametrize(
    ("objective", "settings", "graphs"),
    [
        (lambda: SimCLR(proj_hidden_dim=32, proj_output_dim=16), {"mask_mode": "one"}, 5),
        (lambda: SimCLR(proj_hidden_dim=32, proj_output_dim=16), {"masked_views": "batched", "update": "simultaneous"}, 2),
        (lambda: BYOL(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32), {"masked_views": "batched"}, 5),
        (lambda: SimSiam(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=8, mask_both_views=True), {}, 5),
    ],
    ids=["simclr-adios-s", "simclr-simultaneous", "byol-batched", "simsiam-both-views"],
)
def test_compiled_objective_traces_the_step_it_runs_eagerly(
    objective: Any, settings: dict[str, Any], graphs: int, graphs_per_part: Counter[str],
) -> None:
    """The step with compile_objective, as dynamo traces it (its graphs run eagerly, no code
    generated), against the eager step: the same updates in float64 (with batched views batch
    norm takes its grouped form under the compiler, which rounds differently), without a graph
    break. The
    step calls the compiled losses: the objective's graphs are its forward's three (the encoder
    step's, the mask step's clean views without gradients and its masked views with the encoder
    side frozen; one in a simultaneous step) and a loss's per player. Measured here: the updates
    (up to 0.2) differ by 2e-15 at most, as much as the eager batched and sequential steps do.
    SimCLR's batched loss, traced, is compared with the eager one in ``tests/test_distributed.py``
    (on two processes, where it gathers), and its batched step's graphs in the first-epoch test."""
    eager = _double_updates(_model(objective=objective(), **settings))
    graphs_per_part.clear()
    traced = _double_updates(_model(objective=objective(), compile_objective=True, **settings))
    name = type(objective()).__name__
    assert dict(graphs_per_part) == {name: graphs}, dict(graphs_per_part)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(traced, eager, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [False, True], ids=["", "objective"])
def test_compiled_parts_in_a_cuda_graph_mode_match_eager_on_the_cpu(objective: bool) -> None:
    """compile_encoder and compile_mask_generator="reduce-overhead" (with ``objective``,
    compile_objective too) with batched views: three steps (on the CPU the mode compiles without
    CUDA graphs, so this checks the step under the compiler, not the graphs)."""
    eager = _updates(_model(masked_views="batched"), steps=3)
    torch._dynamo.reset()
    mode = "reduce-overhead"
    compiled = _updates(_model(masked_views="batched", compile_encoder=mode, compile_mask_generator=mode,
                               compile_objective=mode if objective else False), steps=3)
    torch._dynamo.reset()
    # measured here: 2.5e-6 (encoder) and 3.1e-6 (mask generator); with the objective, 2.5e-6 and
    # 3.3e-6; bounds kept wide, as the mask generator's gradient is tiny and noise-like (1e-3
    # apart with the encoder alone compiled)
    assert _rel(compiled["encoder"], eager["encoder"]) < 1e-2
    assert _rel(compiled["mask_generator"], eager["mask_generator"]) < 0.1


def _fast_data(image_size: int, train_size: int, val_size: int, batch_size: int) -> ShapesDataModule:
    """Shapes with the augmentation on the device, compiled in ``"reduce-overhead"`` mode."""
    return ShapesDataModule(train_size=train_size, val_size=val_size, image_size=image_size, batch_size=batch_size, num_workers=0,
                            pin_memory=False, augment_on="device", compile_augmentation="reduce-overhead")


def _compiled_fit(graphs: Counter[str], data: ShapesDataModule, epochs: int, callbacks: list[pl.Callback], **model: Any) -> list[dict[str, int]]:
    """Fit on the GPU fast path (``data`` from :func:`_fast_data`, batched views, the encoder and the
    mask generator compiled in ``"reduce-overhead"`` mode, and the objective where ``model`` says
    so); returns the graphs made by each epoch's end, counted by ``graphs`` (the
    ``graphs_per_part`` fixture)."""
    per_epoch: list[dict[str, int]] = []

    class Graphs(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            per_epoch.append(dict(graphs))

    mode = "reduce-overhead"
    fit_model = _model(image_size=data.image_size, masked_views="batched", compile_encoder=mode, compile_mask_generator=mode, **model)
    trainer = {} if any(isinstance(c, OnlineKNN) for c in callbacks) else {"limit_val_batches": 0}
    quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=[*callbacks, Graphs()], **trainer).fit(fit_model, datamodule=data)
    return per_epoch


@pytest.mark.parametrize("variant", [{}, {"mask_mode": "one"}, {"update": "simultaneous"}, {"compile_objective": "reduce-overhead"}])
def test_compiled_fit_compiles_in_its_first_epoch_only(variant: dict[str, Any], graphs_per_part: Counter[str]) -> None:
    """The GPU fast path (device augmentation, batched views, the three compile options; the
    objective's too in the last case) through a fit with validation and the evaluation
    callbacks, a partial last evaluation batch included: every graph is made in the first epoch,
    none after, no part nears dynamo's recompile limit (past it, a part would silently run
    eager), and no graph breaks. dynamo's guards decide this, not the code generator, so the
    graphs are counted, not generated (``graphs_per_part``)."""
    data = _fast_data(image_size=16, train_size=32, val_size=20, batch_size=8)
    callbacks = [OnlineKNN(), OnlineLinearProbe(num_classes=data.num_classes), MaskQuality()]
    per_epoch = _compiled_fit(graphs_per_part, data, epochs=3, callbacks=callbacks, **variant)
    parts = {"SmallConvNet", "MaskGenerator", "DeviceAugmentation"}
    # with the objective compiled, the encoder's graphs in training are the objective's (SimCLR)
    assert set(graphs_per_part) == parts | ({"SimCLR"} if "compile_objective" in variant else set()), graphs_per_part
    assert per_epoch[0] == per_epoch[-1] == dict(graphs_per_part), per_epoch  # epoch 0's end follows its validation
    assert max(graphs_per_part.values()) < torch._dynamo.config.recompile_limit, graphs_per_part
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_compiled_resnet18_at_96_px_makes_the_graphs_of_a_32_px_run(graphs_per_part: Counter[str]) -> None:
    """The 96 px, N=6 setting of the GPU benchmark (ResNet18 with its ImageNet stem, batched views,
    the three parts compiled) traces into as many graphs as exact ADIOS at 32 px did on the GPU
    (five: the augmentation, the U-Net, and the encoder's three: its step, the clean views under
    ``no_grad`` and the masked views), all in the first epoch, with no graph break. It fails on a
    graph break in the stem's max-pool, which the 32 px stem does not have (tried with a hook that
    breaks the graph there: 9 encoder graphs)."""
    data = _fast_data(image_size=96, train_size=8, val_size=4, batch_size=4)
    per_epoch = _compiled_fit(graphs_per_part, data, epochs=2, callbacks=[], encoder="resnet18", encoder_kwargs={}, num_masks=6)
    assert per_epoch[0] == per_epoch[-1] == {"DeviceAugmentation": 1, "MaskGenerator": 1, "ResNet": 3}, per_epoch
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
