"""Several views as one batch with per-view batch norm (``adios_pl.batched_views``), against the
obvious version: one forward per view."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from adios_pl import ADIOSModule
from adios_pl.batched_views import batch_norm_per_view, forward_views, grouped_batch_norm
from adios_pl.errors import ConfigurationError
from adios_pl.objectives import SimCLR

from conftest import make_loader, quiet_trainer

VIEWS, BATCH = 4, 5  # four views: plain batch norm takes the per-view function (MIN_VIEWS_FOR_FUNCTION)


def _net(norm: Any) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6), nn.BatchNorm1d(6),
    ).double()


def _views(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    # views with different statistics, so pooled statistics would be visibly wrong
    return [torch.randn(BATCH, 3, 6, 6, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(VIEWS)]


def _buffers(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm2d,
        lambda c: nn.BatchNorm2d(c, momentum=None),  # cumulative averages
        lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        lambda c: nn.BatchNorm2d(c, affine=False),
        nn.SyncBatchNorm,  # a single process: its own forward falls back to plain batch norm
    ],
    ids=["momentum", "cumulative", "untracked", "not affine", "sync"],
)
def test_per_view_batch_norm_equals_one_forward_per_view(norm: Any) -> None:
    torch.manual_seed(0)
    batched = _net(norm)
    separate = copy.deepcopy(batched)
    views = _views()
    for _ in range(2):  # twice: the second round starts from updated running statistics
        with batch_norm_per_view([batched], VIEWS):
            out = batched(torch.cat(views))
        expected = torch.cat([separate(v) for v in views])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        ours, theirs = _buffers(batched), _buffers(separate)
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-12, msg=k)
    # gradients too
    (out.square().sum()).backward()
    (expected.square().sum()).backward()
    for (name, p), q in zip(batched.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("frozen", [(), ("weight", "bias"), ("bias",)], ids=["all gradients", "frozen parameters", "bias frozen"])
def test_per_view_batch_norm_of_bfloat16_channels_last_input_is_bitwise_one_forward_per_view(frozen: tuple[str, ...]) -> None:
    """The fast path (one autograd function over all views, ``out=`` kernels) runs the same
    kernels as separate forwards, so on bfloat16 channels-last input (float32 parameters, as
    under autocast) it gives the same bits; the parameters' gradients are summed in another
    order, hence a float32 tolerance for them."""
    torch.manual_seed(0)
    batched = nn.BatchNorm2d(8)
    nn.init.normal_(batched.weight)
    nn.init.normal_(batched.bias)
    separate = copy.deepcopy(batched)
    for layer in (batched, separate):
        for name, p in layer.named_parameters():
            p.requires_grad_(name not in frozen)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(BATCH, 8, 6, 6, generator=g) * (1 + i) + i for i in range(VIEWS)])
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_separate = x.detach().clone().requires_grad_()
    with batch_norm_per_view([batched], VIEWS):
        out = batched(x)
    expected = torch.cat([separate(v) for v in x_separate.chunk(VIEWS)])
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)
    for k, v in _buffers(separate).items():
        assert torch.equal(_buffers(batched)[k], v), k
    grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    out.backward(grad)
    expected.backward(grad)
    assert x.grad is not None and x_separate.grad is not None and torch.equal(x.grad, x_separate.grad)
    for (name, p), q in zip(batched.named_parameters(), separate.parameters()):
        if name in frozen:
            assert p.grad is None and q.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("views", [VIEWS, 2])
def test_plain_batch_norm_takes_the_path_without_cat(views: int) -> None:
    """The fast path is taken for plain batch norm from four views on (its forward dispatches no
    ``cat``); the check above would pass just as well on the fallback of one forward and a
    ``cat`` per layer. Two views take that fallback (it costs less host time there)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    net, images = _net(nn.BatchNorm2d), torch.cat(_views()[:views])
    with batch_norm_per_view([net], views), Ops() as ops:
        net(images)
    assert ops.names.count("aten.native_batch_norm") == 2 * views, ops.names
    assert ops.names.count("aten.cat") == (0 if views >= 4 else 2), ops.names


def test_second_derivatives_equal_one_forward_per_view() -> None:
    """The per-view function's backward is differentiable: a gradient penalty (the input
    gradient's norm, differentiated again) matches one forward per view, in float64."""

    def penalty_gradients(net: nn.Module, batched: bool) -> list[Tensor]:
        images = torch.cat(_views()).requires_grad_()
        if batched:
            with batch_norm_per_view([net], VIEWS):
                out = net(images)
        else:
            out = torch.cat([net(v) for v in images.split(BATCH)])
        (grad,) = torch.autograd.grad(out.square().sum(), images, create_graph=True)
        return list(torch.autograd.grad(grad.square().sum(), list(net.parameters())))

    torch.manual_seed(0)
    net = _net(nn.BatchNorm2d)
    ours, theirs = penalty_gradients(copy.deepcopy(net), True), penalty_gradients(copy.deepcopy(net), False)
    for a, b in zip(ours, theirs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm2d,
        lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        lambda c: nn.BatchNorm2d(c, affine=False),
        lambda c: nn.BatchNorm2d(c, momentum=0.3, eps=1e-3),
    ],
    ids=["momentum", "untracked", "not affine", "other momentum and eps"],
)
def test_grouped_batch_norm_equals_one_forward_per_view(norm: Any) -> None:
    """The form the compiler sees (one reduction over all views), called eagerly in float64:
    outputs, input and parameter gradients, and running statistics after two rounds, against the
    layer's own forward on each view in turn."""
    torch.manual_seed(0)
    grouped = norm(3).double()
    if grouped.weight is not None:
        nn.init.normal_(grouped.weight)
        nn.init.normal_(grouped.bias)
    separate = copy.deepcopy(grouped)
    for step in range(2):
        views = [v.requires_grad_() for v in _views(seed=step)]
        images = torch.cat(views).detach().requires_grad_()
        out = grouped_batch_norm(grouped, images, VIEWS)
        expected = torch.cat([separate(v) for v in views])
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        for k, v in _buffers(separate).items():
            torch.testing.assert_close(_buffers(grouped)[k], v, rtol=1e-12, atol=1e-12, msg=k)
        weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(images.grad, torch.cat([v.grad for v in views]), rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(grouped.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_grouped_batch_norm_keeps_half_precision_statistics_in_float32() -> None:
    """bfloat16 channels-last input with float32 parameters, as under autocast: statistics from the
    float32 values of the input, as PyTorch's kernels keep them; the output in bfloat16, within its
    rounding of one forward per view."""
    torch.manual_seed(0)
    grouped = nn.BatchNorm2d(3)
    nn.init.normal_(grouped.weight)
    separate = copy.deepcopy(grouped)
    images = (torch.cat(_views()).float() * 3).bfloat16().contiguous(memory_format=torch.channels_last)
    out = grouped_batch_norm(grouped, images, VIEWS)
    expected = torch.cat([separate(v) for v in images.chunk(VIEWS)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=2e-2)
    for k, v in _buffers(separate).items():
        torch.testing.assert_close(_buffers(grouped)[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_grouped_batch_norm_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="momentum"):
        grouped_batch_norm(nn.BatchNorm2d(3, momentum=None).double(), torch.cat(_views()), VIEWS)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        grouped_batch_norm(nn.BatchNorm1d(3).double(), torch.randn(VIEWS, 3, dtype=torch.float64), VIEWS)


def test_compiled_batched_views_take_the_grouped_form() -> None:
    """Under ``torch.compile`` plain batch norm of batched views is traced as one ``var_mean``
    per layer, not one batch norm per view joined by ``cat``, and computes what one forward per
    view does (float64; dynamo's graph run eagerly, no code generation)."""
    import torch._dynamo

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _net(nn.BatchNorm2d)
    separate = copy.deepcopy(net)
    compiled = torch.compile(net, backend=keep)
    views = _views()
    with batch_norm_per_view([net], VIEWS):
        out = compiled(torch.cat(views))
    torch._dynamo.reset()
    torch.testing.assert_close(out, torch.cat([separate(v) for v in views]), rtol=1e-10, atol=1e-12)
    for k, v in _buffers(separate).items():
        torch.testing.assert_close(_buffers(net)[k], v, rtol=1e-12, atol=1e-12, msg=k)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert sum("var_mean" in t for t in targets) == 2, targets  # the two batch-norm layers
    assert not any("batch_norm" in t or t.endswith("cat") for t in targets), targets


def test_without_per_view_statistics_the_result_differs() -> None:
    """The check above has teeth: one forward of the stacked views with pooled statistics differs."""
    torch.manual_seed(0)
    net = _net(nn.BatchNorm2d)
    views = _views()
    expected = torch.cat([copy.deepcopy(net)(v) for v in views])
    assert (net(torch.cat(views)) - expected).abs().max() > 0.1


def test_layers_are_restored_on_exit_and_on_error() -> None:
    net = _net(nn.BatchNorm2d)
    with pytest.raises(RuntimeError, match="inside"):
        with batch_norm_per_view([net, net], VIEWS):  # a module listed twice is patched once
            first = net[1].forward
            assert type(first).__name__ == "_PerViewForward"
            raise RuntimeError("inside")
    assert "forward" not in net[1].__dict__ and "forward" not in net[5].__dict__
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert net(x).shape == (4, 6)
    with batch_norm_per_view([net], VIEWS):
        assert net[1].forward is first, "a new forward object each time would make torch.compile recompile"


def test_a_layer_with_its_own_forward_is_refused() -> None:
    net = _net(nn.BatchNorm2d)
    net[1].forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(ConfigurationError, match='masked_views="sequential"'):
        with batch_norm_per_view([net], VIEWS):
            pass
    assert "forward" in net[1].__dict__ and "forward" not in net[5].__dict__


def test_a_copy_made_while_batched_does_not_point_at_the_original() -> None:
    net = _net(nn.BatchNorm2d)
    with batch_norm_per_view([net], VIEWS):
        copied = copy.deepcopy(net)
    # the copy runs as a plain network on its own statistics, and can be batched later
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    before = (net[1].running_mean.clone(), copied[1].running_mean.clone())
    torch.testing.assert_close(copied(x), copy.deepcopy(net)(x))
    assert torch.equal(net[1].running_mean, before[0]) and not torch.equal(copied[1].running_mean, before[1])
    with batch_norm_per_view([copied], 2):
        copied(x)


def test_forward_views_rejects_outputs_without_a_batch_dimension() -> None:
    def objective(encoder: nn.Module, images: Tensor) -> dict[str, Tensor]:
        features = encoder(images)
        return {"features": features, "scale": features.new_ones(())}

    with pytest.raises(ConfigurationError, match='masked_views="sequential"'):
        forward_views(objective, _net(nn.BatchNorm2d), _views(), [])


def _step(**kw: Any) -> dict[str, Tensor]:
    """Parameters and buffers after two float64 batches."""
    torch.manual_seed(0)
    model = ADIOSModule(
        encoder="small_cnn", encoder_kwargs={"width": 8}, objective=SimCLR(proj_hidden_dim=32, proj_output_dim=16),
        num_masks=3, image_size=16, mask_width=8, warmup_epochs=0, lr=0.05, mask_lr=0.05, sparsity_weight=0.5, **kw,
    ).double()
    quiet_trainer(max_steps=2, precision="64-true").fit(model, make_loader(n=16, size=16))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("update", ["alternating", "simultaneous"])
def test_batched_masked_views_give_the_sequential_step(update: str) -> None:
    """Weights and batch-norm running statistics (``tests/test_exactness.py`` compares the weights
    with the reference); simultaneous rounds too."""
    sequential = _step(update=update)
    batched = _step(update=update, masked_views="batched")
    for k, v in sequential.items():
        torch.testing.assert_close(batched[k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_batched_views_run_the_encoder_once_per_player() -> None:
    torch.manual_seed(0)
    model = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, num_masks=3, image_size=16, mask_width=8,
                        warmup_epochs=0, masked_views="batched")
    sizes: list[int] = []
    model.encoder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    quiet_trainer(max_steps=1).fit(model, make_loader(n=8, size=16))
    # encoder step: the clean view and the three masked views at once (32 images); mask step: the
    # clean view without gradients (8), then the masked views (24)
    assert sizes == [32, 8, 24]


def test_compiled_network_does_not_recompile_every_step() -> None:
    """Installing the same per-view forward object each time keeps ``torch.compile``'s guards
    valid: alternating plain and batched forwards compiles each variant once (a new object per
    step would recompile every step until the recompile limit, then fall back to eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = _net(nn.BatchNorm2d)
    net.compile(backend="eager")  # dynamo's guards without code generation: quick
    views = _views()
    for _ in range(5):
        net(views[0])
        with batch_norm_per_view([net], VIEWS):
            net(torch.cat(views))
    assert counters["frames"]["ok"] == 2, dict(counters["frames"])
    torch._dynamo.reset()
