"""Operations dispatched per training step: the host's share of a launch-bound GPU step.

On a GPU the ADIOS step is limited by the host launching kernels (``profile_gpu.md``: no
synchronisation left, the GPU idle about half of the step), so the number of tensor operations a
step dispatches is what the host pays for. That count does not depend on the machine, so it is
measured here on the CPU: the real Trainer loop (device augmentation, OnlineKNN,
OnlineLinearProbe, the two optimisers) trains ResNet18 on an image folder, and every operation
that reaches a kernel (forward, backward, optimiser, augmentation, callbacks) between the end of
batch ``--warmup - 1`` and the end of batch ``--warmup`` is counted, by variant and by the code
that issued it. The CPU optimisers loop over weights where CUDA ones use multi-tensor kernels
(``foreach``), so ``--foreach`` (default) switches them to the CUDA setting. Each entry also
gives the kernels issued outside the parts that ``compile_encoder``, ``compile_mask_generator``
and ``compile_augmentation`` compile (``kernel_ops_outside_compilable_parts``): what would stay
eager, and launch one by one, with those parts compiled; ``--compile-objective`` counts the
objective's forward and losses (``compile_objective``) among those parts, ``--compile-optimizers``
the optimisers' updates (``compile_optimizers``).

    python benchmarks/ops_per_step.py --data-dir /data/cifar10/train --label after --out benchmarks/results/ops_per_step.json
    python benchmarks/ops_per_step.py --data-dir /data/cifar10/train --precision bf16-mixed --label "after, bf16-mixed" \
        --variants baseline_batched adios_batched adios_s_batched simultaneous_batched --out benchmarks/results/ops_per_step.json
    python benchmarks/ops_per_step.py --data-dir /data/cifar10/train --log-every 50 --variants baseline_batched adios_batched \
        adios_s_batched simultaneous_batched --out benchmarks/results/ops_outside_compiled.json
    python benchmarks/ops_per_step.py --data-dir /data/cifar10/train --log-every 50 --precision bf16-mixed --compile-objective \
        --variants baseline_batched adios_batched adios_s_batched simultaneous_batched --out benchmarks/results/ops_outside_compiled.json
    python benchmarks/ops_per_step.py --data-dir /data/cifar10/train --log-every 50 --precision bf16-mixed --compile-objective \
        --compile-optimizers --variants baseline_batched adios_batched adios_s_batched simultaneous_batched \
        --out benchmarks/results/ops_outside_compiled.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import traceback
import unittest.mock
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.models import ResNet

import adios_pl.module
from adios_pl import ADIOSModule
from adios_pl.callbacks import OnlineKNN, OnlineLinearProbe
from adios_pl.data import ImageFolderDataModule
from adios_pl.data.device_augment import DeviceAugmentation
from adios_pl.masks import MaskGenerator
from adios_pl.objectives import Objective
from adios_pl.optim import compile_step

from train_speed import VARIANTS, append_entries  # benchmarks/train_speed.py

#: Where an operation is attributed: the innermost frame in one of these, else "other".
PLACES = ("adios_pl", "pytorch_lightning", "lightning_fabric", "torch/optim", "torch/autograd", "torchvision", "lightly")


#: Operations that launch no kernel on a GPU (besides views): allocation and metadata.
NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like, torch.ops.aten.new_empty,
             torch.ops.aten.new_empty_strided, torch.ops.aten.detach,
             torch.ops.aten.lift_fresh, torch.ops.aten._local_scalar_dense}


#: The parts that ``compile_encoder``, ``compile_mask_generator`` and the DataModule's
#: ``compile_augmentation`` compile (the augmentation's one-kernel draw, which stays eager, counts with it).
COMPILABLE = (ResNet, MaskGenerator, DeviceAugmentation)


class CountOps(TorchDispatchMode):
    """Counts the operations that reach a kernel, by name and by the code that issued them, and
    how many of the kernels are the compilable parts' (``parts``, by default :data:`COMPILABLE`,
    and functions called through :meth:`in_part`): issued in their forward, or in the backward of
    the autograd nodes their forward made."""

    def __init__(self, parts: tuple[type, ...] = COMPILABLE) -> None:
        super().__init__()
        self.parts = parts
        self.ops: collections.Counter[str] = collections.Counter()
        self.places: collections.Counter[str] = collections.Counter()
        self.kernels = 0
        self.part_kernels = 0
        self.outside: collections.Counter[str] = collections.Counter()  # the other kernels, by place (and backward node)
        self._depth = 0  # inside a compilable part's forward
        self._inputs: list[set[int]] = []  # the autograd nodes of each open part's inputs
        self._nodes: list[Any] = []  # the parts' autograd nodes, held so that their ids stay theirs
        self._node_ids: set[int] = set()
        self._hooks: list[Any] = []

    def __enter__(self) -> "CountOps":
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._part_starts),
                       nn.modules.module.register_module_forward_hook(self._part_ends)]
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._nodes, self._node_ids = [], set()
        super().__exit__(*exc)

    def in_part(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, counted as a compilable part (a compiled function that is no module's forward)."""
        self._enter(args)
        output = fn(*args)
        self._exit(output)
        return output

    def _part_starts(self, module: nn.Module, args: Any) -> None:
        if isinstance(module, self.parts):
            self._enter(args)

    def _part_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, self.parts):
            self._exit(output)

    def _enter(self, args: Any) -> None:
        self._depth += 1
        self._inputs.append({id(t.grad_fn) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.grad_fn})

    def _exit(self, output: Any) -> None:
        self._depth -= 1
        stop = self._inputs.pop()  # the graph before the part; parameters' AccumulateGrad stays eager too
        todo = [t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.grad_fn]
        while todo:
            node = todo.pop()
            if id(node) in stop or id(node) in self._node_ids or type(node).__name__ == "AccumulateGrad":
                continue
            self._nodes.append(node)
            self._node_ids.add(id(node))
            todo += [f for f, _ in node.next_functions if f is not None]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        place = "other"
        for frame in reversed(traceback.extract_stack()[:-1]):
            if any(p in frame.filename for p in PLACES):
                place = f"{frame.filename.split('/site-packages/')[-1].split('/src/')[-1]}:{frame.name}"
                break
        self.places[place] += 1
        if not (func.is_view or func.overloadpacket in NO_KERNEL):
            self.kernels += 1
            node = torch._C._current_autograd_node()  # in a backward: the node being evaluated
            if self._depth > 0 or id(node) in self._node_ids:
                self.part_kernels += 1
            else:
                self.outside[f"{place} ({type(node).__name__})" if node is not None else place] += 1
        return func(*args, **(kwargs or {}))


class OneStep(pl.Callback):
    """Holds ``mode`` active from the end of batch ``warmup - 1`` to the end of batch ``warmup``:
    over the next batch's transfer and augmentation, its training step and the callbacks' work
    on it."""

    def __init__(self, warmup: int, mode: Any) -> None:
        self.warmup, self.mode = warmup, mode
        self.active = self.done = False

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and not (self.active or self.done):
            self.mode.__enter__()
            self.active = True
        elif self.active:
            self.mode.__exit__(None, None, None)
            self.active, self.done = False, True
            trainer.should_stop = True


def one_batch(args: argparse.Namespace, variant: str, mode: Any) -> None:
    """Train ResNet18 (``args``: data, image size, masks, batch, optimiser, precision) in the
    real loop, with the two callbacks, and hold ``mode`` (a dispatch mode) over one batch."""
    pl.seed_everything(0)
    datamodule = ImageFolderDataModule(train_dir=args.data_dir, image_size=args.image_size, batch_size=args.batch_size,
                                       num_workers=0, augment_on="device")
    model = ADIOSModule(encoder="resnet18", image_size=args.image_size, warmup_epochs=0, optimizer=args.optimizer,
                        **{"num_masks": args.num_masks, **VARIANTS[variant]})
    if args.foreach:
        original = model.configure_optimizers

        def with_foreach() -> Any:
            optimizers, schedulers = original()
            for opt in optimizers:
                if hasattr(opt, "foreach"):  # our LARS
                    opt.foreach = True
                for group in opt.param_groups:  # torch's SGD and AdamW
                    group["foreach"] = True
            return optimizers, schedulers

        model.configure_optimizers = with_foreach  # type: ignore[method-assign]
    if args.compile_objective:  # the losses compile_objective compiles count as parts too
        plain_loss = model._loss
        model._loss = lambda name: functools.partial(mode.in_part, plain_loss(name))  # type: ignore[method-assign]
    if args.compile_optimizers:  # the real compile_step, with a torch.compile that counts the update as a part
        def counted_step(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> None:
            with unittest.mock.patch.object(torch, "compile", lambda fn, **kw: functools.partial(mode.in_part, fn)):
                compile_step(optimizer, options)  # adios_pl.optim's own: adios_pl.module's name holds an earlier stand-in

        adios_pl.module.compile_step = counted_step  # type: ignore[attr-defined]
        model.hparams["compile_optimizers"] = True
    if args.log_every > 1:  # as on an accelerator: logs and read-backs every log_every_n_steps batches
        model._readback_interval = lambda: args.log_every  # type: ignore[method-assign]
    step = OneStep(args.warmup, mode)
    trainer = pl.Trainer(
        accelerator="cpu", precision=args.precision, max_steps=args.warmup + 3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[OnlineKNN(), OnlineLinearProbe(num_classes=10), step],
    )
    trainer.fit(model, datamodule=datamodule)
    assert step.done, "the measured batch was not reached: lower --warmup or give more images"


def count(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The operations of one batch of ``variant``."""
    result = CountOps(COMPILABLE + (Objective,) if args.compile_objective else COMPILABLE)
    one_batch(args, variant, result)
    return {
        "variant": variant, "num_masks": args.num_masks, "image_size": args.image_size, "optimizer": args.optimizer,
        "compile_objective": args.compile_objective, "compile_optimizers": args.compile_optimizers,
        "foreach": args.foreach, "precision": args.precision, "log_every": args.log_every, "ops_per_step": sum(result.ops.values()), "kernel_ops_per_step": result.kernels,
        "kernel_ops_outside_compilable_parts": result.kernels - result.part_kernels,
        "outside_compilable_parts_by_place": dict(result.outside.most_common(args.top)),
        "by_place": dict(result.places.most_common(args.top)), "by_op": dict(result.ops.most_common(args.top)),
        "torch": torch.__version__, "label": args.label,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="image folder (class folders), at least (warmup + 2) batches")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="does not change the count; small is quick")
    parser.add_argument("--optimizer", default="lars", choices=["sgd", "lars", "adamw"])
    parser.add_argument("--no-foreach", dest="foreach", action="store_false", help="keep the CPU optimisers' per-weight loop")
    parser.add_argument("--precision", default="32-true", help="bf16-mixed counts autocast's casts too, as on a GPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=1,
                        help="batches between the module's logs and read-backs; 1 (default) as on the CPU, where the "
                             "counted batch logs; on an accelerator it is log_every_n_steps (50), and most batches do not")
    parser.add_argument("--compile-objective", action="store_true",
                        help="count the objective's forward and losses (compile_objective) among the compilable parts")
    parser.add_argument("--compile-optimizers", action="store_true",
                        help="count the optimisers' updates (compile_optimizers) among the compilable parts")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--label", default="", help="a note stored with each entry (e.g. the code version)")
    parser.add_argument("--out", default=None, help="append the entries to this JSON list")
    args = parser.parse_args()
    entries = []
    for variant in args.variants:
        entry = count(args, variant)
        entries.append(entry)
        print(f"{variant:>22}: {entry['ops_per_step']:6d} operations per step, {entry['kernel_ops_per_step']:6d} of them "
              f"kernels (not views or allocations), {entry['kernel_ops_outside_compilable_parts']} of those outside the "
              f"encoder, the mask generator{', the objective' if args.compile_objective else ''}"
              f"{', the optimisers' if args.compile_optimizers else ''} and the augmentation", flush=True)
    if args.out:
        append_entries(args.out, entries)


if __name__ == "__main__":
    main()
