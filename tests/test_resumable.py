"""The training loader resumes part-way through an epoch with exactly the images a straight run
would have trained on next, and shares the order across processes as Lightning's DDP does."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from adios_pl.data.base import SSLDataModule
from adios_pl.data.resumable import EpochSampler, ResumableLoader, SeededDataset
from adios_pl.module import ADIOSModule
from adios_pl.objectives import SimCLR

from conftest import StopAt, quiet_trainer


class Numbered(Dataset):
    """``n`` small random uint8 images whose target is their index."""

    def __init__(self, n: int) -> None:
        self.images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index


class NumberedData(SSLDataModule):
    def __init__(self, n: int = 40, **kw: Any) -> None:
        super().__init__(image_size=8, batch_size=8, pin_memory=False, blur_prob=0.0, **kw)
        self.n = n

    def setup(self, stage: str | None = None) -> None:
        self.pretrain_set = Numbered(self.n)


class Record(pl.Callback):
    """The targets and the first views of every training batch, in order."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.views: list[torch.Tensor] = []
        self.seeds: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append(batch[1].tolist())
        self.views.append(batch[0][0].clone())
        augmentation = getattr(trainer.datamodule, "_device_augmentation", None)
        if augmentation is not None:  # the seed of this batch's draws
            self.seeds.append(augmentation.generator.initial_seed())


def model() -> ADIOSModule:
    torch.manual_seed(0)
    return ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 4}, objective=SimCLR(proj_hidden_dim=16, proj_output_dim=8),
                       num_masks=2, image_size=8, mask_width=8, warmup_epochs=0)


def fit(record: Record, max_steps: int, num_workers: int, callbacks: Sequence[pl.Callback] = (), ckpt_path: str | None = None,
        limit: int | float = 1.0, **data: Any) -> None:
    pl.seed_everything(5, verbose=False)
    trainer = quiet_trainer(max_steps=max_steps, callbacks=[record, *callbacks], enable_checkpointing=bool(callbacks),
                            limit_val_batches=0, limit_train_batches=limit)
    trainer.fit(model(), datamodule=NumberedData(num_workers=num_workers, **data), ckpt_path=ckpt_path)


@pytest.mark.parametrize(("every", "stop", "num_workers", "limit"),
                         [(2, 3, 0, 1.0), (2, 7, 2, 1.0), (5, 5, 2, 1.0), (4, 4, 2, 4), (3, 3, 0, 0.6)],
                         ids=["epoch-0-in-process", "epoch-1-two-workers", "at-an-epoch-end-two-workers",
                              "at-a-limited-epoch-end-two-workers", "at-a-fraction-epoch-end"])
def test_a_mid_epoch_resume_trains_on_the_images_a_straight_run_would(
    tmp_path: Path, every: int, stop: int, num_workers: int, limit: int | float,
) -> None:
    """40 images in batches of 8: 5 batches an epoch (or ``limit_train_batches`` of them), two
    epochs. A checkpoint every ``every`` batches; the first run stops after ``stop`` batches and
    resumes from its last checkpoint: in epoch 0, in epoch 1, or one written at the end of an
    epoch's last batch."""
    per = limit if isinstance(limit, int) else int(5 * limit)
    straight = Record()
    fit(straight, 2 * per, num_workers, limit=limit)
    assert len(straight.batches) == 2 * per
    for epoch in (0, 1):
        images = sum(straight.batches[per * epoch:per * (epoch + 1)], [])
        assert len(set(images)) == 8 * per, "no image twice in an epoch"
    if per == 5:
        assert sorted(sum(straight.batches[:5], [])) == list(range(40)), "a whole epoch shows every image"
    assert straight.batches[:per] != straight.batches[per:], "the epochs' orders differ"

    first = Record()
    fit(first, 2 * per, num_workers, [ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=every, save_last=True,
                                                      save_top_k=0), StopAt(stop)], limit=limit)
    done = stop // every * every
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": (done - 1) // per, "images_done": 8 * ((done - 1) % per + 1), "epoch_images": 8 * per,
                      "num_replicas": 1}]

    resumed = Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(resumed, 2 * per, num_workers, ckpt_path=str(tmp_path / "last.ckpt"), limit=limit)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert first.batches == straight.batches[:stop]
    assert resumed.batches == straight.batches[done:]
    assert len(resumed.views) == len(straight.views) - done
    assert all(torch.equal(a, b) for a, b in zip(resumed.views, straight.views[done:])), "the views, bit for bit"


def test_a_mid_epoch_resume_makes_the_device_views_a_straight_run_would(tmp_path: Path) -> None:
    """With ``augment_on="device"`` each batch's draws come from (seed, rank, epoch, batch), so
    the resumed run's views equal the straight run's, bit for bit, not only its images."""
    straight, first, resumed = Record(), Record(), Record()
    fit(straight, 10, 0, augment_on="device")
    fit(first, 10, 0, [ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_last=True, save_top_k=0), StopAt(3)],
        augment_on="device")
    fit(resumed, 10, 0, ckpt_path=str(tmp_path / "last.ckpt"), augment_on="device")
    assert resumed.batches == straight.batches[2:]
    assert len(resumed.views) == 8 and all(torch.equal(a, b) for a, b in zip(resumed.views, straight.views[2:]))
    assert len(set(straight.seeds)) == 10, "two batches (of one epoch or of two) draw from one seed"


def test_host_views_depend_on_neither_the_workers_nor_the_main_processs_generator() -> None:
    """Each image's views are drawn from (seed, epoch, position): the same with 0 or 2 loader
    workers, different in the next epoch; and loading in the main process leaves torch's,
    Python's and numpy's generators as they were."""
    def views(num_workers: int, epoch: int) -> list[torch.Tensor]:
        data = NumberedData(num_workers=num_workers)
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [view for (first, second), _ in loader for view in (first, second)]

    in_process, workers = views(0, 0), views(2, 0)
    assert len(in_process) == 10 and all(torch.equal(a, b) for a, b in zip(in_process, workers))
    assert not torch.equal(in_process[0], in_process[1]), "the two views of a batch are two draws"
    assert not any(torch.equal(a, b) for a, b in zip(in_process, views(0, 1))), "a new epoch, new views"

    loader = NumberedData(num_workers=0).train_dataloader()
    iterator = iter(loader)  # making the iterator draws its base seed; the items must draw nothing
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    assert len(list(iterator)) == 5
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))


class Draws(Dataset):
    """Each item is one draw from torch's generator, one from Python's and one from numpy's."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return float(torch.rand(())), random.random(), float(np.random.random())


def test_a_seeded_item_draws_alike_from_torch_python_and_numpy_in_any_process() -> None:
    """A key gives the same draws in the main process and in loader workers, one item at a time
    or a batch at once (``__getitems__``), for transforms that draw from torch's generator
    (torchvision's) and for those that draw from Python's or numpy's."""
    data = SeededDataset(Draws())
    keys = [(index, (3, 0, position)) for index, position in [(0, 0), (1, 1), (0, 2), (2, 3)]]
    here = [data[key] for key in keys]
    assert len({draw for item in here for draw in item}) == 12, "each key draws its own numbers"
    assert data.__getitems__(keys) == here
    one_at_a_time = DataLoader(data, batch_size=None, sampler=keys, num_workers=2)
    assert [tuple(float(v) for v in item) for item in one_at_a_time] == here
    batches = DataLoader(data, batch_size=2, sampler=keys, num_workers=2, collate_fn=list)
    assert [item for batch in batches for item in batch] == here

    torch.manual_seed(11), random.seed(11), np.random.seed(11)  # not what the last key left
    in_process = iter(DataLoader(data, batch_size=2, sampler=keys, num_workers=0, collate_fn=list))
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    assert [item for batch in in_process for item in batch] == here
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1], "generators put back"
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[2])), "numpy's put back"


def test_seeded_items_take_their_place_in_the_order_across_processes() -> None:
    """Keys are (seed, epoch, position): each process's share holds its own positions of the
    padded order, so the padded repeats of an image get views of their own; a resumed epoch's
    keys are the tail of the whole epoch's."""
    data = Numbered(21)
    shares = []
    for rank in (0, 1):
        sampler = EpochSampler(data, 2, rank, seed=3, with_seeds=True)
        sampler.set_epoch(4)
        share = list(sampler)
        torchs = DistributedSampler(data, 2, rank, shuffle=True, seed=3)
        torchs.set_epoch(4)
        assert [index for index, _ in share] == list(torchs)
        shares.append(share)
    keys = [key for share in shares for _, key in share]
    assert sorted(key[2] for key in keys) == list(range(22)) and {key[:2] for key in keys} == {(3, 4)}
    sampler = EpochSampler(data, 2, 1, seed=3, with_seeds=True)
    sampler.set_epoch(4)
    sampler.resume_at(4, 7)
    assert list(sampler) == shares[1][7:]


@pytest.mark.parametrize("seed", [0, 7])
def test_each_process_takes_the_share_lightning_gives_it_under_ddp(seed: int) -> None:
    """Lightning puts ``DistributedSampler(dataset, shuffle=True, seed=PL_GLOBAL_SEED)`` into a
    shuffled training loader under DDP; the sampler here gives the same indices, epoch by epoch."""
    data = Numbered(21)  # not a multiple of the processes: padded alike
    for rank in (0, 1):
        ours, torchs = EpochSampler(data, 2, rank, seed), DistributedSampler(data, 2, rank, shuffle=True, seed=seed)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert list(ours) == list(torchs)


def test_a_resumed_epoch_skips_its_first_images_and_only_that_epoch() -> None:
    sampler = EpochSampler(Numbered(24), seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume_at(2, 16)
    assert list(sampler) == whole[16:] and list(sampler) == whole[16:], "every iteration of the epoch (Lightning makes two)"
    sampler.set_epoch(3)
    assert len(list(sampler)) == 24


def test_the_state_counts_only_batches_training_took_and_survives_a_new_batch_size() -> None:
    sampler = EpochSampler(Numbered(24), seed=1)
    loader = ResumableLoader(Numbered(24), sampler, batch_size=8)
    iterator = iter(loader)
    next(iterator), next(iterator)  # fetched (a prefetch) but not yet counted as trained on
    loader.count_batch()
    assert loader.state_dict() == {"epoch": 0, "images_done": 8, "epoch_images": 24, "num_replicas": 1}
    other = ResumableLoader(Numbered(24), EpochSampler(Numbered(24), seed=1), batch_size=4)
    other.load_state_dict(loader.state_dict())
    assert [t for _, targets in other for t in targets.tolist()] == [t for _, targets in loader for t in targets.tolist()][8:]


def test_another_number_of_processes_starts_the_epoch_afresh(recwarn: pytest.WarningsRecorder) -> None:
    loader = ResumableLoader(Numbered(24), EpochSampler(Numbered(24)), batch_size=8)
    loader.load_state_dict({"epoch": 0, "images_done": 24, "epoch_images": 24, "num_replicas": 2})  # an epoch's end
    assert not recwarn.list
    assert loader.sampler.epoch == 1 and len(list(loader)) == 3
    with pytest.warns(UserWarning, match="part-way through an epoch by 2 training processes and this run has 1"):
        loader.load_state_dict({"epoch": 4, "images_done": 8, "epoch_images": 24, "num_replicas": 2})
    assert loader.sampler.epoch == 4 and len(list(loader)) == 3


class SaveTargets(pl.Callback):
    """Each rank writes the targets of its training batches when training ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append(batch[1].tolist())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(self.batches, self.out / f"targets{trainer.global_rank}.pt")


def test_a_datamodule_resumes_its_next_loader_once() -> None:
    """The checkpoint's loader state reaches the loader the DataModule makes next (Lightning
    restores the DataModule before it asks for the loader), and only that one: a later fit()
    with the same DataModule starts its epoch whole."""
    data = NumberedData(n=24, num_workers=0)
    data.load_state_dict({"train_loader": {"epoch": 2, "images_done": 16, "epoch_images": 24, "num_replicas": 1}})
    resumed, later = data.train_dataloader(), data.train_dataloader()
    assert resumed.sampler.epoch == 2 and len(list(resumed)) == 1
    assert later.sampler.epoch == 0 and len(list(later)) == 3


class RestoresAfterSetup(SingleDeviceStrategy):
    """A strategy that restores checkpoints after ``configure_optimizers``, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_a_strategy_that_restores_after_setup_resumes_its_loader_and_that_fit_only(tmp_path: Path) -> None:
    """Restoring after ``configure_optimizers`` made the loader, the checkpoint's state goes to that
    loader: the resumed fit trains on a straight run's remaining batches. A later ``fit`` with the
    same DataModule starts its epoch whole, not from the checkpoint again."""
    straight = Record()
    fit(straight, 10, 0)
    fit(Record(), 10, 0, [ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_last=True, save_top_k=0),
                          StopAt(3)])
    data = NumberedData(num_workers=0)
    for ckpt_path, skipped in ((str(tmp_path / "last.ckpt"), 2), (None, 0)):
        pl.seed_everything(5, verbose=False)
        record = Record()
        trainer = quiet_trainer(max_steps=10, callbacks=[record], enable_checkpointing=False, limit_val_batches=0,
                                strategy=RestoresAfterSetup(torch.device("cpu")))
        trainer.fit(model(), datamodule=data, ckpt_path=ckpt_path)
        assert record.batches == straight.batches[skipped:]


def test_two_processes_resume_mid_epoch_with_their_own_shares(tmp_path: Path, two_processes: Any) -> None:
    """Under DDP (2 CPU processes) Lightning keeps the loader's sampler, so each rank's batches are
    its ``DistributedSampler`` share for the seed: disjoint, together every image once an epoch.
    The checkpoint holds rank 0's loader state; each rank applies it to its own share: after 2 of
    an epoch's 5 batches, each resumes with its share's third batch of that epoch."""
    def run(callbacks: list[pl.Callback], ckpt_path: str | None = None) -> list[list[list[int]]]:
        pl.seed_everything(5, verbose=False)
        data = NumberedData(n=40, num_workers=0)
        data.batch_size = 4
        two_processes.fit(model(), data, ckpt_path, max_steps=10, limit_val_batches=0, num_sanity_val_steps=0,
                          callbacks=[SaveTargets(tmp_path), *callbacks], enable_checkpointing=ckpt_path is None)
        return [torch.load(tmp_path / f"targets{rank}.pt") for rank in (0, 1)]

    first = run([ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=2, save_last=True, save_top_k=0), StopAt(3)])
    resumed = run([], str(tmp_path / "ck" / "last.ckpt"))
    for rank in (0, 1):
        straight = []
        for epoch in (0, 1):
            sampler = DistributedSampler(range(40), num_replicas=2, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            share = list(sampler)
            straight += [share[i:i + 4] for i in range(0, 20, 4)]
        assert first[rank] == straight[:3]
        assert resumed[rank] == straight[2:]
    epoch_0 = [image for rank in (0, 1) for batch in first[rank][:2] + resumed[rank][:3] for image in batch]
    assert sorted(epoch_0) == list(range(40))
