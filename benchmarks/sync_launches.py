"""Operations of the per-step synchronisation under data parallelism, counted in two CPU processes.

With DDP's own gradient hooks off, ``ADIOSModule`` averages each player's gradients
(``all_reduce_gradients``) and broadcasts the floating-point buffers (``broadcast_buffers``) once
per step. On a GPU each operation below that is not a view launches a kernel, and the step is
limited by the host's launches, so this counts them: ResNet18 ADIOS at 32 px, N=4, in
channels-last as on CUDA, with a random gradient on every trainable parameter, two gloo
processes on the CPU (the count does not depend on the machine).

    python benchmarks/sync_launches.py
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adios_pl import ADIOSModule
from adios_pl.distributed import all_reduce_gradients, broadcast_buffers

from ops_per_step import CountOps  # benchmarks/ops_per_step.py


def count(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = ADIOSModule(encoder="resnet18", image_size=32, num_masks=4)
        assert model.mask_generator is not None
        model.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.mask_generator.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        players = {"encoder side": list(model.encoder_parameters()), "mask generator": list(model.mask_generator.parameters())}
        rows = []
        for name, params in players.items():
            for p in params:
                p.grad = torch.randn_like(p)
            with CountOps() as ops:
                all_reduce_gradients(params)
            rows.append((f"gradient average, {name} ({len(params)} parameters)", ops))
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        with CountOps() as ops:
            broadcast_buffers(model.buffers())
        rows.append((f"buffer broadcast ({len(buffers)} floating-point buffers)", ops))
        if rank == 0:
            print(f"torch {torch.__version__}: operations per step that launch kernels (all operations)")
            for label, ops in rows:
                print(f"  {label}: {ops.kernels} ({sum(ops.ops.values())})")
    finally:
        dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(count, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
