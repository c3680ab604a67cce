"""Work per training step, and the time it would take at a card's peak: the step's floors.

The GPU profiles (``profile_gpu.md``) show the 32 px step limited by the host's kernel launches,
and the GPU's own time spent mostly outside matrix products (batch norm, copies). This counts,
over one batch in the real Trainer loop (the window of ``ops_per_step.py``: ResNet18, device
augmentation, OnlineKNN, OnlineLinearProbe, the optimisers):

- the floating-point operations of the matrix products and convolutions
  (``torch.utils.flop_counter``: forward and backward, the U-Net, the heads, the probe, the
  augmentation's blur); ``--peak-tflops`` turns them into milliseconds at the card's dense bf16
  peak (989 TFLOP/s on the H100 and H200 SXM, NVIDIA's data sheets);
- the bytes that the operations which launch kernels read and write, as eager PyTorch runs them
  (each operation reads its inputs from memory and writes its outputs; an expanded tensor
  counts once; views and allocations are not operations), by operation, and the milliseconds
  they take at the memory bandwidth of the H100 SXM (3.35 TB/s) and the H200 (4.8).
  Fusing operations (``torch.compile``) removes the traffic between them, so this is the
  eager step's floor, not the compiled one's.

Both depend on shapes and dtypes only, so they are measured on the CPU, at the GPU runs'
precision (``--precision bf16-mixed``: the CPU's autocast, which gives convolutions, batch norm
and the element-wise operations between them CUDA's dtypes) and batch size (NT-Xent's
similarities grow with its square, the optimisers' traffic not at all). bf16 runs slowly on a
CPU without bf16 instructions, so ``--fit-batches`` measures two small batches and gives the
figures on the straight line through them: in float32, ResNet18 ADIOS at 32 px, the line
through 16 and 32 images gives 120.3 GB and 6.903 TFLOP at 256, where 256 measures 120.5 and
6.904. A real step stays above the larger floor: its kernels neither run at peak nor overlap
perfectly.

    python benchmarks/flops_per_step.py --data-dir /data/cifar10/train --fit-batches 8 16 --out benchmarks/results/flops_per_step.json
    python benchmarks/flops_per_step.py --data-dir /data/cifar10/train --fit-batches 4 8 --image-size 96 --num-masks 6 \\
        --variants adios_batched --out benchmarks/results/flops_per_step.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from typing import Any, Dict, Iterator, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ops_per_step import NO_KERNEL, one_batch  # benchmarks/ops_per_step.py
from train_speed import VARIANTS, append_entries  # benchmarks/train_speed.py


def extent(t: torch.Tensor) -> int:
    """Bytes a tensor spans in memory: its elements, an expanded dimension (stride 0) once."""
    if t.numel() == 0:
        return 0
    size = t.element_size()
    for n, stride in zip(t.shape, t.stride()):
        size *= n if stride != 0 else 1
    return size


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class CountBytes(TorchDispatchMode):
    """Bytes read and written by the operations that launch kernels, by operation: each distinct
    tensor argument is read once (the target of an in-place operation too, but not an ``out=``
    argument); the outputs, and the arguments the operation writes into, are written once."""

    def __init__(self) -> None:
        super().__init__()
        self.read: collections.Counter[str] = collections.Counter()
        self.written: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in NO_KERNEL:
            return out
        name = str(func.overloadpacket)
        values = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        read, written = [], [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for argument, value in zip(func._schema.arguments, values):
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            writes = argument.alias_info is not None and argument.alias_info.is_write
            if writes:
                written += tensors
            if not (writes and argument.kwarg_only):  # an out= argument is only written
                read += tensors
        self.read[name] += sum(extent(t) for t in {_key(t): t for t in read}.values())
        self.written[name] += sum(extent(t) for t in {_key(t): t for t in written}.values())
        return out


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    """Two dispatch modes entered and left together (as one for ``one_batch``)."""
    with first, second:
        yield


#: Memory bandwidth of the cards the GPU runs used, TB/s (NVIDIA's data sheets, SXM).
BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8}

Counts = Dict[str, Dict[str, float]]


def measure(args: argparse.Namespace, variant: str, batch: int) -> Counts:
    """The floating-point operations, bytes read and bytes written, by operation, of one batch of
    ``batch`` images of ``variant``."""
    mode, traffic = FlopCounterMode(display=False), CountBytes()
    one_batch(argparse.Namespace(**{**vars(args), "batch_size": batch}), variant, _both(mode, traffic))
    # by operation only: the counter's attribution to modules misplaces backward work
    flops = {str(op): float(n) for op, n in mode.get_flop_counts()["Global"].items()}
    return {"flop": flops, "read": dict(traffic.read), "written": dict(traffic.written)}


def along_line(first: Counts, second: Counts, at: float) -> Counts:
    """Each count on the straight line through ``first`` (at 0) and ``second`` (at 1), at ``at``."""
    return {
        kind: {k: first[kind].get(k, 0) + (second[kind].get(k, 0) - first[kind].get(k, 0)) * at
               for k in first[kind].keys() | second[kind].keys()}
        for kind in first
    }


def entry(args: argparse.Namespace, variant: str, counts: Counts, measured_at: list[int]) -> dict[str, Any]:
    """The JSON entry of one variant at ``args.batch_size`` images per batch."""
    def top(counts: Mapping[str, float]) -> dict[str, float]:
        return dict(collections.Counter(counts).most_common(args.top))

    flops, read, written = (sum(counts[kind].values()) for kind in ("flop", "read", "written"))
    moved = collections.Counter(counts["read"]) + collections.Counter(counts["written"])
    gbytes = (read + written) / 1e9
    return {
        "variant": variant, "num_masks": args.num_masks if VARIANTS[variant].get("num_masks", 1) else 0,
        "image_size": args.image_size, "batch_size": args.batch_size, "measured_at_batch_sizes": measured_at,
        "precision": args.precision, "tflop_per_step": round(flops / 1e12, 3),
        "tflop_by_op": {k: round(v / 1e12, 3) for k, v in top(counts["flop"]).items()},
        "floor_ms_at_peak": round(flops / (args.peak_tflops * 1e12) * 1e3, 2), "peak_tflops": args.peak_tflops,
        "gb_moved_per_step": round(gbytes, 2), "gb_read_written": [round(read / 1e9, 2), round(written / 1e9, 2)],
        "gb_by_op": {k: round(v / 1e9, 3) for k, v in top(moved).items()},
        "floor_ms_at_bandwidth": {card: round(gbytes / tbs, 2) for card, tbs in BANDWIDTH_TBS.items()},
        "torch": torch.__version__, "label": args.label,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="image folder (class folders), at least (warmup + 2) batches")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["baseline_batched", "adios_batched", "adios_s_batched", "simultaneous_batched"])
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="the GPU runs' batch (the loss grows with its square)")
    parser.add_argument("--fit-batches", type=int, nargs=2, metavar=("B1", "B2"), default=None,
                        help="measure at these two batch sizes and give --batch-size's figures on the line through "
                             "them (bf16 runs slowly on CPUs without bf16 instructions)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--precision", default="bf16-mixed", help="as the GPU runs; sets the dtypes of the traffic")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--label", default="", help="a note stored with each entry (e.g. the code version)")
    parser.add_argument("--out", default=None, help="append the entries to this JSON list")
    args = parser.parse_args()
    # what one_batch reads besides: the GPU runs' optimiser, and their logging interval
    args.optimizer, args.foreach, args.log_every = "lars", True, 50
    entries = []
    for variant in args.variants:
        if args.fit_batches:
            first, second = (measure(args, variant, b) for b in args.fit_batches)
            b1, b2 = args.fit_batches
            counts = along_line(first, second, (args.batch_size - b1) / (b2 - b1))
        else:
            counts = measure(args, variant, args.batch_size)
        result = entry(args, variant, counts, args.fit_batches or [args.batch_size])
        entries.append(result)
        print(f"{variant:>22} {args.image_size:3d} px: {result['tflop_per_step']:.2f} TFLOP per step "
              f"({result['floor_ms_at_peak']:.1f} ms at {args.peak_tflops:g} TFLOP/s), {result['gb_moved_per_step']:.1f} GB moved "
              f"({result['floor_ms_at_bandwidth']} ms); top: {result['gb_by_op']}", flush=True)
    if args.out:
        append_entries(args.out, entries)


if __name__ == "__main__":
    main()
