"""Shared fixtures: tiny two-view batches, quiet CPU trainers, a free port for process groups."""

from __future__ import annotations

import os
import socket
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo
from torch.utils.data import DataLoader, Dataset

from adios_pl.checkpoint import AtomicCheckpointIO

os.environ.setdefault("PL_DISABLE_FORK", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*")
torch.set_num_threads(2)


class TwoViewTensors(Dataset):
    """Fixed random two-view samples ``((x1, x2), target)``."""

    def __init__(self, n: int, size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x1 = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        self.x2 = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return (self.x1[i], self.x2[i]), self.y[i]


def make_loader(n: int = 16, batch_size: int = 8, size: int = 32, seed: int = 0, **kw: Any) -> DataLoader:
    """Unshuffled loader over :class:`TwoViewTensors`."""
    return DataLoader(TwoViewTensors(n, size, seed, kw.pop("dtype", torch.float32)), batch_size=batch_size, shuffle=False, **kw)


def quiet_trainer(**kw: Any) -> pl.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or summary, with adios-pl's atomic
    checkpoint I/O as the command line sets it (all overridable)."""
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    args.update(kw)
    return pl.Trainer(**args)


class StopAt(pl.Callback):
    """Stop training after the batch at which ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: the address of a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def two_processes() -> Iterator[Any]:
    """Two spawned CPU processes, kept for the session, that run a test's job on both ranks
    (:class:`two_processes.TwoProcesses`)."""
    from two_processes import TwoProcesses

    pair = TwoProcesses()
    yield pair
    pair.close()


@pytest.fixture
def loader() -> DataLoader:
    return make_loader()


@pytest.fixture
def graphs_per_part(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """``torch.compile`` made quick: dynamo traces as usual, and a backend counts each compiled
    part's graphs and runs them eagerly, with no code generated. What dynamo's guards decide
    (which graphs, when it recompiles) is then checked in seconds. A part is named by the class
    of the module (or object) whose method is compiled, a function by its name; dynamo's own
    counters (``torch._dynamo.utils.counters``, graph breaks among them) start empty."""
    real_compile = torch.compile
    graphs: Counter[str] = Counter()

    def counting_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        part = type(fn.__self__).__name__ if hasattr(fn, "__self__") else fn.__qualname__

        def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
            graphs[part] += 1
            return gm.forward

        return real_compile(fn, backend=backend, dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph breaks are counted there
    yield graphs
    torch._dynamo.reset()
