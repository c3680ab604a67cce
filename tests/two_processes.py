"""Two CPU processes for the tests' multi-process checks, spawned once and given one job after another.

Spawning a pair for each test cost 6-8 s of imports (two fresh interpreters on 2 cores), more
than the test itself. Here the pair stays: :meth:`TwoProcesses.run` hands ``fn(rank, *args)`` to
both and returns their results. Each job starts as a freshly spawned process would: the test
process's environment variables and random states, its own copy of the arguments, no process
group (a job makes its own, or a fit under Lightning's ``ddp`` makes one as under ``torchrun``,
each process told its rank by ``LOCAL_RANK``), the warning filters of the process's start, and
no memory of warnings shown (Lightning's once-only caches are emptied, so a job that makes a
warning an error sees it even if an earlier job showed it). What else a job changes in a module
stays for the next, so a job that patches a function puts it back
(``tests/test_sync_batch_norm.py``); and since the pair are daemons, a job starts no processes
of its own (loaders with ``num_workers=0``). A job that fails or outlives its time limit ends
the pair; the next job spawns a new one.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import sys
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning_utilities.core.rank_zero import WarningCache

from conftest import free_port, quiet_trainer

WORLD = 2
LIGHTNING_PACKAGES = {"pytorch_lightning", "lightning_fabric", "lightning"}


def _serve(rank: int, jobs: Any, results: Any) -> None:
    """Rank ``rank``'s loop: run each job, report ``(rank, ok, result or traceback)``, undo its state."""
    torch.set_num_threads(1)  # the two share 2 cores
    filters = list(warnings.filters)
    while (job := jobs.get()) is not None:
        fn, args, environ, rng_states = pickle.loads(job)
        os.environ.clear()
        os.environ.update(environ)
        _set_rng_states(rng_states)
        try:
            results.put((rank, True, fn(rank, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            warnings.filters[:] = filters
            _forget_shown_warnings()


def _forget_shown_warnings() -> None:
    """Let the next job see every warning again: Lightning's once-only caches (module-level
    ``WarningCache`` sets) are emptied, and Python's registries of warnings already shown are
    made stale, as a change of the filters through ``warnings`` itself would make them."""
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in LIGHTNING_PACKAGES:
            for value in list(vars(module).values()):
                if isinstance(value, WarningCache):
                    value.clear()
    warnings._filters_mutated()  # type: ignore[attr-defined]


class TwoProcesses:
    """A pair of spawned CPU processes that run a test's job on rank 0 and rank 1."""

    def __init__(self) -> None:
        self._processes: list[Any] = []

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._jobs = [context.SimpleQueue() for _ in range(WORLD)]
        self._results = context.Queue()
        self._processes = [context.Process(target=_serve, args=(rank, self._jobs[rank], self._results), daemon=True)
                           for rank in range(WORLD)]
        for process in self._processes:
            process.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300) -> list[Any]:
        """``[fn(0, *args), fn(1, *args)]``, each run in its process; a failure on either rank is
        an ``AssertionError`` with its traceback, and so is a job that outlives ``timeout`` seconds."""
        if not self._processes or not all(process.is_alive() for process in self._processes):
            self.close()
            self._start()
        # pickled here: a queue would hand both processes one shared-memory copy of each tensor,
        # and each rank's optimiser would step the other's parameters too
        job = pickle.dumps((fn, args, dict(os.environ), _collect_rng_states()))
        for jobs in self._jobs:
            jobs.put(job)
        results: list[Any] = [None] * WORLD
        for _ in range(WORLD):
            try:
                rank, ok, result = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise AssertionError(f"{fn.__name__} did not finish on both ranks in {timeout} s") from None
            if not ok:
                self.close()  # the other rank may wait in a collective for ever
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{result}")
            results[rank] = result
        return results

    def fit(self, model: Any, datamodule: Any, ckpt_path: str | None = None, **trainer_kwargs: Any) -> None:
        """``quiet_trainer(devices=2, strategy="ddp", **trainer_kwargs).fit(model, datamodule, ckpt_path)``
        on both processes, each told its rank as ``torchrun`` would tell it."""
        self.run(_fit, free_port(), model, datamodule, ckpt_path, trainer_kwargs)

    def close(self) -> None:
        """Stop the processes (a job still running is killed)."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join()
        self._processes = []


def _fit(rank: int, port: int, model: Any, datamodule: Any, ckpt_path: str | None, trainer_kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))
    trainer = quiet_trainer(devices=WORLD, strategy="ddp", **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
