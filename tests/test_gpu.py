"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from adios_pl import ADIOSModule
from adios_pl.evaluation import extract_features
from adios_pl.objectives import BYOL, SimCLR

from conftest import make_loader, quiet_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(**kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(encoder="resnet18", objective=SimCLR(), num_masks=4, image_size=96, mask_width=16, warmup_epochs=0, lr=0.05, mask_lr=0.05)
    args.update(kw)
    return ADIOSModule(**args)


def _updates(model: ADIOSModule, steps: int = 2, **trainer: Any) -> dict[str, torch.Tensor]:
    before = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    quiet_trainer(accelerator="gpu", max_steps=steps, **trainer).fit(model, make_loader(n=32 * steps, batch_size=32, size=model.image_size))
    after = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in after.values())
    return {p: torch.cat([(after[k] - before[k]).flatten() for k in before if k.startswith(p + ".")]) for p in ("encoder", "mask_generator")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_mixed_precision_steps_match_fp32(precision: str, objective: str) -> None:
    make = (lambda: SimCLR()) if objective == "simclr" else (lambda: BYOL())
    fp32 = _updates(_model(objective=make()), precision="32-true")
    mixed = _updates(_model(objective=make()), precision=precision)
    assert _rel(mixed["encoder"], fp32["encoder"]) < 0.15
    cosine = torch.nn.functional.cosine_similarity(mixed["mask_generator"], fp32["mask_generator"], dim=0)
    assert cosine > 0.5, float(cosine)


def test_channels_last_and_compile_match_eager() -> None:
    # The mask generator's gradient at initialisation is tiny and noise-like, so other kernels
    # (channels-last, compiled) move it far more than the encoder's: compare its direction.
    eager = _updates(_model(), precision="32-true")
    fast = _updates(_model(channels_last=True, compile_encoder=True), precision="32-true")
    assert _rel(fast["encoder"], eager["encoder"]) < 0.05, _rel(fast["encoder"], eager["encoder"])
    cosine = torch.nn.functional.cosine_similarity(fast["mask_generator"], eager["mask_generator"], dim=0)
    assert cosine > 0.5, float(cosine)


def test_features_outlive_the_next_cuda_graph_replay() -> None:
    """Features from the encoder replayed as CUDA graphs stay valid after later replays (the kNN
    callback keeps each evaluation batch's features until the epoch ends). small_cnn at 32 px:
    what is checked is how the module hands out the graphs' outputs, and it compiles in seconds."""
    torch._dynamo.reset()
    model = _model(encoder="small_cnn", image_size=32, compile_encoder="reduce-overhead", channels_last=True).cuda().eval()
    model.configure_model()
    images = [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(3)]
    with torch.no_grad():
        first = [model.embed(x) for x in images]  # warm-up and recording
        later = [model.embed(x) for x in images]  # replays into the same memory
    for a, b in zip(first, later):
        torch.testing.assert_close(a, b)
    # the offline evaluation's feature extraction keeps every batch too
    features, _ = extract_features(model.encoder, [(x, torch.zeros(8, dtype=torch.long)) for x in images], torch.device("cuda"))
    torch.testing.assert_close(features, torch.cat(later))


@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_batched_views_equal_sequential_on_the_gpu_in_float64(objective: str) -> None:
    """The CUDA kernels (cuDNN batch norm on slices of a larger batch, channels-last) keep the
    batched step equal to the sequential one; float64, so rounding cannot hide a difference."""
    make = (lambda: SimCLR()) if objective == "simclr" else (lambda: BYOL())

    def after_two_steps(**kw: Any) -> dict[str, torch.Tensor]:
        model = _model(objective=make(), image_size=32, channels_last=True, **kw).double()
        quiet_trainer(accelerator="gpu", max_steps=2, precision="64-true").fit(model, make_loader(n=64, batch_size=32, size=32))
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}

    sequential, batched = after_two_steps(), after_two_steps(masked_views="batched")
    for key, value in sequential.items():  # weights and batch-norm statistics
        torch.testing.assert_close(batched[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("masked_views", ["sequential", "batched"])
def test_sync_batchnorm_ddp_runs(tmp_path: Any, masked_views: str) -> None:
    model = _model(objective=BYOL(), masked_views=masked_views)
    trainer = quiet_trainer(accelerator="gpu", devices=2, strategy="ddp_spawn", sync_batchnorm=True, max_steps=2)
    trainer.fit(model, make_loader(n=128, batch_size=32, size=96))
    assert trainer.global_step == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_per_view_sync_batch_norm_kernels_on_one_gpu(tmp_path: Any, dtype: torch.dtype) -> None:
    """PyTorch's CUDA kernels for synchronised batch norm, called as PerViewSyncBatchNorm calls
    them, in a process group of one (a second GPU only adds the collectives, which the CPU test
    with two processes covers): 3 views give F.batch_norm of each view, in float64 to 1e-10 and
    in bf16 channels-last (float32 parameters) to bf16 rounding, running statistics included,
    with no host synchronisation."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from adios_pl.sync_batch_norm import PerViewSyncBatchNorm

    views, channels = 3, 8
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        generator = torch.Generator().manual_seed(0)
        x = (torch.randn(views * 16, channels, 6, 6, generator=generator, dtype=torch.float64) * 2 + 0.5).cuda().to(dtype)
        grad = torch.randn(x.shape, generator=generator, dtype=torch.float64).cuda().to(dtype)
        if dtype == torch.bfloat16:
            x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        weight = (torch.rand(channels, generator=generator, dtype=param_dtype) + 0.5).cuda()
        bias = torch.randn(channels, generator=generator, dtype=param_dtype).cuda()

        def run(sync: bool) -> list[torch.Tensor]:
            xs, w, b = x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
            mean, var = torch.zeros(channels, dtype=param_dtype, device="cuda"), torch.ones(channels, dtype=param_dtype, device="cuda")
            if sync:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    out = PerViewSyncBatchNorm.apply(xs, w, b, mean, var, views, 0.1, 1e-5, dist.group.WORLD)
                    out.backward(grad)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                out = torch.cat([F.batch_norm(part, mean, var, w, b, True, 0.1, 1e-5) for part in xs.chunk(views)])
                out.backward(grad)
            assert xs.grad is not None and w.grad is not None and b.grad is not None
            return [out.detach(), xs.grad, w.grad, b.grad, mean, var]

        tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
        for name, got, want in zip(["output", "input gradient", "weight gradient", "bias gradient", "running mean", "running variance"], run(True), run(False)):
            close = tolerance if name in ("output", "input gradient") or dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(got, want, **close, msg=name)  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


def test_offline_evaluation_on_the_gpu_matches_the_cpu() -> None:
    from adios_pl.evaluation import knn_accuracy, linear_probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=generator) * 2
    y = torch.randint(0, 5, (600,), generator=generator)
    x = centres[y] + torch.randn(600, 32, generator=generator)
    split = (x[:500], y[:500], x[500:], y[500:])
    on_gpu = (split[0].cuda(), split[1].cuda(), split[2].cuda(), split[3].cuda())
    assert abs(linear_probe(*on_gpu, 5, epochs=10) - linear_probe(*split, 5, epochs=10)) <= 0.01
    assert knn_accuracy(*on_gpu, 5, k=20) == knn_accuracy(*split, 5, k=20)


def test_device_augmentation_never_synchronises_and_matches_the_cpu_draws() -> None:
    """On CUDA the two-view pipeline makes no host synchronisation (sync debug mode 'error'
    raises on any), and the distributions of per-view statistics match the same code's on the
    CPU (two-sample KS test at alpha = 0.001; the two devices draw different random numbers)."""
    from test_device_augment import KS_LIMIT, N, ks

    from adios_pl.data.device_augment import DeviceAugmentation

    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = DeviceAugmentation(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), solarization_prob=0.2)
    gpu_images = images.cuda()
    augment.augment(gpu_images[:2])  # the first call moves the module's constants to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v1, v2 = augment(gpu_images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu1, _ = DeviceAugmentation(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), solarization_prob=0.2)(images)
    assert v1.shape == v2.shape == (N, 3, 32, 32) and v1.is_cuda
    for name, stat in (("mean", lambda v: v.mean((1, 2, 3))), ("std", lambda v: v.std((1, 2, 3)))):
        gap = ks(stat(v1.float().cpu()), stat(cpu1))
        assert gap < KS_LIMIT, f"per-view {name} differs between CUDA and CPU: KS {gap:.3f}"


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_augmentation_on_cuda_matches_eager_and_keeps_its_views(mode: bool | str) -> None:
    """compile_augmentation on CUDA: the views of eager code from the same generator (up to the
    fused kernels' rounding), no host synchronisation once compiled, and, replayed as CUDA
    graphs, views that the next batch's replay does not overwrite."""
    from adios_pl.data.device_augment import DeviceAugmentation

    torch._dynamo.reset()
    images = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).cuda()
    settings: dict[str, Any] = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), blur_prob=0.5)
    eager = DeviceAugmentation(32, **settings, generator=torch.Generator("cuda").manual_seed(3))
    compiled = DeviceAugmentation(32, **settings, generator=torch.Generator("cuda").manual_seed(3), compile_augmentation=mode)
    for _ in range(2):  # compiled, warmed up and, in reduce-overhead mode, recorded as a graph
        views, expected = compiled(images), eager(images)
        for view, reference in zip(views, expected):
            torch.testing.assert_close(view, reference, atol=1e-4, rtol=0)
    kept = [v.clone() for v in views]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        later = compiled(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(v, k) for v, k in zip(views, kept)), "a later batch overwrote this batch's views"
    assert not torch.equal(later[0], views[0]), "new draws, new views"


def test_a_training_step_makes_no_host_synchronisation() -> None:
    """Sync debug mode 'error' from the third batch on: any read-back in the step (or the
    callbacks' per-step work) raises. Lightning's logging reads back every log_every_n_steps
    batches, set beyond the run here."""
    import pytorch_lightning as pl

    from adios_pl.callbacks import OnlineLinearProbe

    class Strict(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 4:
                torch.cuda.set_sync_debug_mode("default")

    for kw in ({}, {"mask_mode": "one"}, {"update": "simultaneous"}, {"nonfinite": "skip"}, {"masked_views": "batched"}):
        model = _model(image_size=32, **kw)
        try:
            quiet_trainer(accelerator="gpu", max_steps=5, log_every_n_steps=1000, limit_val_batches=0,
                          callbacks=[OnlineLinearProbe(num_classes=4), Strict()]).fit(
                model, make_loader(n=32 * 5, batch_size=32, size=32))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def exact_kernels() -> Iterator[None]:
    """Convolutions and matrix products in full float32 (no TF32) and cuDNN's deterministic
    algorithms for the test's duration: the same kernels then give the same numbers run after
    run, and kernels that compute the same thing in another order differ by float32 rounding only."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


@pytest.mark.parametrize("objective", [False, True], ids=["", "objective"])
@pytest.mark.parametrize("masked_views", ["sequential", "batched"])
def test_cuda_graph_replays_match_the_same_compiled_kernels(masked_views: str, objective: bool, exact_kernels: None) -> None:
    """compile_encoder="reduce-overhead" (with batched views the mask generator's too; with
    ``objective``, compile_objective too): three training steps, the later ones replayed from
    recorded CUDA graphs, against the same compiled kernels run without graphs (the default mode).

    With deterministic kernels the two differ only where a replay reads a stale input or
    overwrites an output still in use, which moves the updates far more than rounding does. The
    allowance is three times the spread that rounding alone makes, measured here: the same eager
    steps with contiguous instead of channels-last tensors (other cuDNN kernels, the same
    arithmetic); three steps amplify rounding, as the masks follow the mask generator's
    noise-like gradient. Every compiled graph must replay as a CUDA graph (no skips).

    small_cnn at 32 px: a replay fault is the step's (how it uses the graphs' inputs and
    outputs), not the encoder's, and the small network compiles in seconds where ResNet18 at
    96 px took minutes. An earlier form compared the graphs with eager steps under TF32, against
    a guessed 5 %, and failed on an H100 at 6.3 %.
    """
    from torch._dynamo.utils import counters  # the compiler's own records (private, and the only ones)
    from torch._inductor.cudagraph_trees import get_manager

    settings: dict[str, Any] = dict(encoder="small_cnn", image_size=32, masked_views=masked_views)
    eager = _updates(_model(channels_last=True, **settings), steps=3, precision="32-true")
    other_kernels = _updates(_model(channels_last=False, **settings), steps=3, precision="32-true")
    runs = {}
    for mode in (True, "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        compile_mask_generator = mode if masked_views == "batched" else False
        runs[mode] = _updates(_model(channels_last=True, compile_encoder=mode, compile_mask_generator=compile_mask_generator,
                                     compile_objective=mode if objective else False, **settings), steps=3, precision="32-true")
    assert counters["inductor"]["cudagraph_skips"] == 0, "a compiled graph ran without CUDA graphs (TORCH_LOGS=cudagraphs says why)"
    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"
    for part in ("encoder", "mask_generator"):
        spread = _rel(other_kernels[part], eager[part])
        gap = _rel(runs["reduce-overhead"][part], runs[True][part])
        assert gap <= 3 * spread + 1e-4, f"{part}: graphs against the same kernels without them {gap:.2e}, rounding spread {spread:.2e}"


def test_compiled_optimizers_on_cuda_equal_eager_in_float64_without_host_synchronisation() -> None:
    """compile_optimizers="reduce-overhead" (Inductor's kernels for the LARS updates, without
    CUDA graphs) against eager: float64, so only the order of the fused kernels' arithmetic
    differs (the tolerance of the float64 batched-views test above). From the third batch on,
    with the updates compiled, any read-back in the step raises."""
    import pytorch_lightning as pl
    from torch._dynamo.utils import counters

    class Strict(pl.Callback):  # by global_step: with 2 batches an epoch, batch_idx never reaches 2
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 4:
                torch.cuda.set_sync_debug_mode("default")

    def after_four_steps(**kw: Any) -> dict[str, torch.Tensor]:
        model = _model(encoder="small_cnn", image_size=32, optimizer="lars", warmup_epochs=1, **kw).double()
        try:
            quiet_trainer(accelerator="gpu", max_steps=4, limit_train_batches=2, precision="64-true", log_every_n_steps=1000,
                          callbacks=[Strict()]).fit(model, make_loader(n=128, batch_size=32, size=32))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}

    eager = after_four_steps()
    torch._dynamo.reset()
    counters.clear()
    compiled = after_four_steps(compile_optimizers="reduce-overhead")
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])  # two per optimiser
    assert counters["inductor"]["cudagraph_skips"] == 0
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-9, atol=1e-12, msg=key)
