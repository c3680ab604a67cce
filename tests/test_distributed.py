"""Two CPU processes (gloo; Lightning's ``ddp`` as under ``torchrun``) give what one process gives
on the concatenated batch; the step's own gradient average and buffer broadcast equal one
collective per tensor."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineKNN, OnlineLinearProbe
from adios_pl.distributed import all_reduce_gradients, broadcast_buffers, check_strategy, gather_in_order
from adios_pl.masking import sample_slots
from adios_pl.objectives import BYOL, SimCLR

from conftest import TwoViewTensors, free_port, quiet_trainer

PER_RANK = 4
STEPS = 2


class LabelledTensors(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], self.y[i]


class ShardedData(pl.LightningDataModule):
    """Rank r sees samples r, r + W, ... in order, so W ranks with batch B see what one process
    with batch W*B sees. Validation: 13 evaluation and 11 bank images (padded by the sampler)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _sampler(self, dataset: Any) -> Any:
        world = self.trainer.world_size
        return DistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False) if world > 1 else None

    def train_dataloader(self) -> DataLoader:
        data = TwoViewTensors(2 * PER_RANK * STEPS, size=16)
        return DataLoader(data, batch_size=self.batch_size, sampler=self._sampler(data))

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(d, batch_size=3, sampler=self._sampler(d)) for d in (LabelledTensors(13), LabelledTensors(11))]


class SaveRankState(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, module: ADIOSModule) -> None:
        probe = next((c for c in trainer.callbacks if isinstance(c, OnlineLinearProbe)), None)
        state = {
            "model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "probe": probe.linear.weight.detach().cpu().clone() if probe else None,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


class DeprecatedCollectivesFail(pl.Callback):
    """In each process, a call of torch's deprecated ``torch.distributed.nn.functional``
    collectives (which Lightning's ``all_gather`` makes) raises: every run would print their
    deprecation warning. So does Lightning's advice to synchronise an epoch-level value, which a
    score logged from gathered rows does not need."""

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        warnings.filterwarnings("error", message="torch.distributed.nn.functional", category=FutureWarning)
        warnings.filterwarnings("error", message="It is recommended to use `self.log")


def _model(objective: Any, norm: str = "gn", **kw: Any) -> ADIOSModule:
    torch.manual_seed(0)
    return ADIOSModule(
        encoder="small_cnn", encoder_kwargs={"width": 8, "norm": norm}, objective=objective, num_masks=3,
        image_size=16, mask_width=8, lr=0.1, mask_lr=0.05, warmup_epochs=0, sparsity_weight=0.5, **kw,
    )


class ToSyncBatchNorm(pl.Callback):
    """``sync_batchnorm=True`` for CPU processes: DDP refuses to wrap a CPU module that has
    ``SyncBatchNorm`` layers, so they replace the batch-norm layers once it is wrapped (the same
    parameters and buffers, as Lightning's conversion keeps them)."""

    def on_train_start(self, trainer: pl.Trainer, module: ADIOSModule) -> None:
        module.encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module.encoder)
        module.objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module.objective)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())


def _fit(model: ADIOSModule, out: Path, callbacks: list, sync_batchnorm: bool = False, two_processes: Any = None) -> None:
    """Fit in this process, or on the 2 processes of ``two_processes`` (each with half the batch)."""
    kwargs = dict(
        max_steps=STEPS, use_distributed_sampler=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, SaveRankState(out), DeprecatedCollectivesFail()] + ([ToSyncBatchNorm()] if sync_batchnorm else []),
    )
    if two_processes is None:
        quiet_trainer(**kwargs).fit(model, datamodule=ShardedData(PER_RANK * 2))
    else:
        two_processes.fit(model, ShardedData(PER_RANK), **kwargs)


def _update_error(initial: dict, a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in initial if k.startswith(prefix) and initial[k].is_floating_point()]
    da = torch.cat([(a[k] - initial[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - initial[k]).flatten() for k in keys])
    assert db.norm() > 0, f"{prefix} did not move"
    return float((da - db).norm() / db.norm())


@pytest.mark.parametrize("name", ["simclr", "byol", "simclr_batched", "simclr_syncbn", "simclr_batched_syncbn", "byol_batched_syncbn"])
def test_two_processes_equal_one_process(tmp_path: Path, name: str, two_processes: Any) -> None:
    """``batched``: masked_views="batched", the negatives of all masked views gathered at once.
    ``syncbn``: batch norm in the encoder (and BYOL's heads and momentum copies) as
    ``SyncBatchNorm``, which in one process is plain batch norm of the whole batch."""
    sync = name.endswith("syncbn")
    objective = SimCLR(proj_hidden_dim=32, proj_output_dim=16) if name.startswith("simclr") else BYOL(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32, batch_norm=sync)
    model = _model(objective, norm="bn" if sync else "gn", masked_views="batched" if "batched" in name else "sequential")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    callbacks = lambda: [OnlineLinearProbe(num_classes=4), OnlineKNN(k=5)]  # noqa: E731
    _fit(copy.deepcopy(model), tmp_path, callbacks(), sync_batchnorm=sync)
    _fit(copy.deepcopy(model), tmp_path, callbacks(), sync_batchnorm=sync, two_processes=two_processes)
    one = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    rank0 = torch.load(tmp_path / "rank0_of2.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1_of2.pt", weights_only=True)
    for prefix in ("encoder.", "objective.projector", "mask_generator."):
        error = _update_error(initial, rank0["model"], one["model"], prefix)
        assert error < 1e-4, f"{name}: {prefix} update differs by {error:.2e} between 2 processes and 1"
    for k in rank0["model"]:
        assert torch.equal(rank0["model"][k], rank1["model"][k]), f"{k} differs between ranks"
    assert torch.equal(rank0["probe"], rank1["probe"]), "the linear probe differs between ranks"
    assert torch.allclose(rank0["probe"], one["probe"], atol=1e-5), "the probe trained on other data in DDP"
    assert rank0["metrics"]["val/knn_top1"] == pytest.approx(one["metrics"]["val/knn_top1"], abs=1e-6)
    assert rank0["metrics"]["val/linear_top1"] == pytest.approx(one["metrics"]["val/linear_top1"], abs=1e-6)


def test_shipped_config_with_all_its_callbacks_on_two_processes(tmp_path: Path) -> None:
    """A shipped config's callbacks at their defaults (probe, kNN, mask pictures, checkpoints) under
    DDP on 2 CPU processes, started as on GPUs (``ddp``: the command runs again for rank 1, which
    resolves ``--ckpt_path last`` on its own): no rank may wait in a collective the other never
    reaches. One batch an epoch: the callbacks' collectives come at the epochs' ends. The small
    conv net (batch norm, as ResNet18) stands in for the config's encoder, which the collectives
    do not depend on: a third less time."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [
        sys.executable, str(root / "tests" / "ddp_cli_stub.py"), "fit", "--config", str(root / "configs/cifar10/simclr_adios_resnet18.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=32-true",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false", "--model.encoder=small_cnn",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a thread per process: the two share 2 cores
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pictures = sorted(tmp_path.rglob("masks/*.png"))
    assert len(pictures) == 2, f"expected one mask picture per validation, found {pictures}"
    (first,) = tmp_path.rglob("last.ckpt")
    # a restart with the same command and --ckpt_path last continues that run (a third epoch only)
    resumed = [a.replace("--trainer.max_epochs=2", "--trainer.max_epochs=3") for a in args] + ["--ckpt_path=last"]
    done = subprocess.run(resumed, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (second,) = set(tmp_path.rglob("last.ckpt")) - {first}
    steps = [torch.load(path, weights_only=True)["global_step"] for path in (first, second)]
    assert 2 * steps[1] == 3 * steps[0] > 0, steps


class SaveFirstViews(pl.Callback):
    """Each rank saves its first training batch as the module receives it (after the device
    augmentation)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            (v1, v2), targets = batch
            torch.save({"v1": v1, "v2": v2, "targets": targets}, self.out / f"views{trainer.global_rank}.pt")


def test_device_augmentation_on_two_processes(tmp_path: Path, two_processes: Any) -> None:
    """augment_on="device" under DDP: each rank trains on its own views of its shard of the cached
    images, and the replicas stay identical (that each rank draws its own crops is checked in
    tests/test_device_augment.py). The encoder has plain batch norm, whose running statistics
    each rank computes from its own views: they agree only through the broadcast from rank 0."""
    from adios_pl.data import ShapesDataModule

    model = _model(SimCLR(proj_hidden_dim=32, proj_output_dim=16), norm="bn")
    data = ShapesDataModule(train_size=64, val_size=8, image_size=16, batch_size=8, num_workers=0, augment_on="device")
    two_processes.fit(model, data, max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[SaveFirstViews(tmp_path), SaveRankState(tmp_path)])
    views = [torch.load(tmp_path / f"views{r}.pt") for r in range(2)]
    states = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(2)]
    assert all(v["v1"].shape == (8, 3, 16, 16) and v["v1"].dtype == torch.float32 for v in views)
    assert not torch.allclose(views[0]["v1"], views[1]["v1"]), "both ranks trained on the same views"
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), f"replicas differ in {key}"


def test_adios_s_ranks_draw_their_own_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank seeds its ADIOS-s slot sampler from the run's seed and its rank: the same slots
    on a rank every time, other slots on another rank (so the ranks' shards are not masked in
    step)."""

    def slots(rank: int) -> torch.Tensor:
        model = _model(SimCLR(proj_hidden_dim=32, proj_output_dim=16), mask_mode="one")
        monkeypatch.setattr(ADIOSModule, "global_rank", property(lambda self: rank))
        torch.manual_seed(0)
        model.on_train_start()
        assert model._slot_generator is not None
        return sample_slots(256, 3, model._slot_generator)

    assert torch.equal(slots(1), slots(1))
    assert not torch.equal(slots(0), slots(1)), "two ranks draw the same slots"


@contextlib.contextmanager
def _gloo(rank: int, port: int) -> Iterator[None]:
    """Rank ``rank`` of a 2-process gloo group on ``port``, for a spawned worker; destroyed on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sync_worker(rank: int, port: int) -> None:
    """One rank of :func:`test_flat_gradient_average_and_buffer_broadcast_match_per_tensor_collectives`."""
    with _gloo(rank, port):
        torch.manual_seed(rank)  # each rank's gradients and buffers differ
        params = [
            torch.nn.Parameter(torch.randn(8, 5)),  # contiguous
            torch.nn.Parameter(torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)),  # a conv weight
            torch.nn.Parameter(torch.randn(2, 3, 2, 2, 2).to(memory_format=torch.channels_last_3d)),
            torch.nn.Parameter(torch.randn(5, 7)),  # its gradient is transposed: not one block in memory order
            torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),  # another dtype
            torch.nn.Parameter(torch.randn(3)),  # no gradient on rank 1
        ]
        grads = [torch.randn_like(params[0]), torch.randn_like(params[1]), torch.randn_like(params[2]),
                 torch.randn(7, 5).t(), torch.randn_like(params[4]), torch.randn(3)]
        if rank == 1:  # a gradient laid out unlike its channels-last parameter, on one rank only
            grads[1] = torch.randn(6, 4, 3, 3)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if rank == 1:
            params[5].grad = None
        # the slow version: one collective per gradient, each in the logical order (a collective
        # reduces memory as it lies, and one gradient's layout differs between the ranks)
        expected = [torch.zeros(3) if (rank == 1 and i == 5) else g.contiguous() for i, g in enumerate(grads)]
        for e in expected:
            dist.all_reduce(e)
            e.div_(2)
        strides = [p.grad.stride() if p.grad is not None else None for p in params]
        all_reduce_gradients(params)
        for i, (p, e) in enumerate(zip(params, expected)):
            assert p.grad is not None and torch.equal(p.grad, e), f"rank {rank}: gradient {i} differs from the per-tensor average"
            assert strides[i] is None or p.grad.stride() == strides[i], f"rank {rank}: gradient {i} changed its layout"

        buffers = [torch.randn(6), torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last),
                   torch.randn(4, dtype=torch.float16), torch.randn(6, 4).t(), torch.tensor(rank + 5)]
        expected = [b.contiguous() for b in buffers[:4]]
        for e in expected:
            dist.broadcast(e, src=0)
        broadcast_buffers(buffers)
        for i, (b, e) in enumerate(zip(buffers, expected)):
            assert torch.equal(b, e), f"rank {rank}: buffer {i} differs from rank 0's"
        assert buffers[4].item() == rank + 5, "an integer buffer (a counter) was broadcast"


def test_flat_gradient_average_and_buffer_broadcast_match_per_tensor_collectives(two_processes: Any) -> None:
    """The one-buffer gradient average and buffer broadcast give, bit for bit, what one collective
    per tensor gives: contiguous, channels-last (2-D and 3-D) and transposed tensors, two dtypes, a
    gradient missing on one rank (averaged as zeros), a gradient whose layout differs between the
    ranks; the gradients keep their layouts."""
    two_processes.run(_sync_worker, free_port())


def _gather_worker(rank: int, port: int) -> None:
    """One rank of :func:`test_gathered_rows_come_back_in_dataset_order_without_padding`."""
    with _gloo(rank, port):
        for n in (7, 8):  # the sampler pads 7 images to 8; 8 need no padding
            mine = list(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=False))
            rows = torch.tensor(mine, dtype=torch.float32).unsqueeze(1).repeat(1, 3) + torch.tensor([0.0, 0.25, 0.5])
            gathered = gather_in_order(rows, n)
            want = torch.arange(n, dtype=torch.float32).unsqueeze(1) + torch.tensor([0.0, 0.25, 0.5])
            assert torch.equal(gathered, want), f"rank {rank}, {n} images: {gathered[:, 0].tolist()}"


def test_gathered_rows_come_back_in_dataset_order_without_padding(two_processes: Any) -> None:
    """What every evaluation callback relies on: the rows of an unshuffled ``DistributedSampler``'s
    shares, gathered, are the dataset's rows once each, in order, the padding dropped."""
    two_processes.run(_gather_worker, free_port())


def _finite_worker(rank: int, port: int) -> None:
    """One rank of :func:`test_a_batch_non_finite_on_one_rank_is_non_finite_on_every_rank`."""
    from adios_pl.nonfinite import all_finite

    with _gloo(rank, port):
        finite = [torch.tensor(1.0), torch.tensor(2.0)]
        assert bool(all_finite(finite)), f"rank {rank}: finite everywhere, yet not finite"
        mine = [torch.tensor(1.0), torch.tensor(float("nan") if rank == 1 else 2.0)]
        assert not bool(all_finite(mine)), f"rank {rank} would keep a batch that rank 1 skips"


def test_a_batch_non_finite_on_one_rank_is_non_finite_on_every_rank(two_processes: Any) -> None:
    """``nonfinite="skip"`` must take one decision on all ranks, or their weights part."""
    two_processes.run(_finite_worker, free_port())


def _warn_once_worker(rank: int, message: str) -> bool:
    """Whether Lightning's once-only cache already holds ``message``; then warns it through the cache."""
    from pytorch_lightning.trainer.connectors.logger_connector import result

    held = message in result.warning_cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result.warning_cache.warn(message)
    return held


def test_each_job_of_the_pair_sees_lightnings_once_only_warnings_again(two_processes: Any) -> None:
    """The 2-process tests make Lightning's sync advice an error; a warning that Lightning shows
    once per process would pass unseen in a job run after one that had shown it."""
    message = "adios-pl tests: a warning Lightning shows once"
    assert two_processes.run(_warn_once_worker, message) == [False, False]
    assert two_processes.run(_warn_once_worker, message) == [False, False], "the second job found the first job's warning in the cache"


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_strategies_that_shard_the_parameters_are_refused(name: str) -> None:
    """FSDP, DeepSpeed and ModelParallel hand each rank a shard of the parameters and reduce its
    gradients in their own hooks; the step's own average of whole gradients would then train wrong
    without an error, so each is refused by name. (Made without ``__init__``: DeepSpeed's needs the
    ``deepspeed`` package, and ``isinstance`` is all the check reads.)"""
    strategy = object.__new__(getattr(pl.strategies, name))
    with pytest.raises(ValueError, match=rf"^strategy: .*single-device or DDP.*; got {name}\. "):
        check_strategy(strategy)


def test_single_device_and_ddp_strategies_are_accepted() -> None:
    class MyDDP(pl.strategies.DDPStrategy):
        """A user's variant of DDP."""

    for strategy in (pl.strategies.SingleDeviceStrategy("cpu"), pl.strategies.DDPStrategy(), MyDDP()):
        check_strategy(strategy)


def test_a_fit_under_a_sharding_strategy_stops_before_its_first_step() -> None:
    """Through a Trainer: ModelParallelStrategy, the one of them that runs on a CPU, stops at
    ``setup`` with the message, before a batch is trained (it trained silently before)."""
    model = ADIOSModule(encoder="small_cnn", num_masks=2, image_size=16, warmup_epochs=0)
    trainer = quiet_trainer(strategy=pl.strategies.ModelParallelStrategy(), max_steps=2)
    try:
        with pytest.raises(ValueError, match=r"^strategy: .*got ModelParallelStrategy\."):
            trainer.fit(model, DataLoader(TwoViewTensors(8, size=16), batch_size=4))
    finally:  # the strategy started a process group of one in this process: later tests start their own
        if dist.is_initialized():
            dist.destroy_process_group()
    assert trainer.global_step == 0


def _compiled_loss_worker(rank: int, port: int) -> None:
    """One rank of :func:`test_the_compiled_nt_xent_gathers_as_the_eager_one`."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from adios_pl.objectives.simclr import nt_xent

    with _gloo(rank, port):
        torch._dynamo.reset()
        counters.clear()
        generator = torch.Generator().manual_seed(rank)
        z0 = torch.randn(4, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        terms = torch.randn(3, 4, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        eager = nt_xent(z0, terms, 0.2)
        compiled = torch.compile(nt_xent, backend="eager")(z0, terms, 0.2)  # dynamo's graph, run eagerly
        assert not counters["graph_break"], f"rank {rank}: {dict(counters['graph_break'])}"
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0)
        for got, want in zip(torch.autograd.grad(compiled, [z0, terms]), torch.autograd.grad(eager, [z0, terms])):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        torch._dynamo.reset()


def test_the_compiled_nt_xent_gathers_as_the_eager_one(two_processes: Any) -> None:
    """compile_objective under DDP: SimCLR's loss, as dynamo traces it, gathers the negatives from
    both ranks (lightly's gather, gradients flowing back) in one graph, with the eager loss's value
    and gradients (float64)."""
    two_processes.run(_compiled_loss_worker, free_port())
