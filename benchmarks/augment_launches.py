"""Kernels per batch of the device augmentation, eager and compiled (``compile_augmentation``).

Eager: every operation of one two-view augmentation call that launches a kernel on a GPU, counted
as ``ops_per_step.py`` counts them (views and allocations excluded). Compiled: the kernel calls
in the code inductor generates for :meth:`DeviceAugmentation.transform` (its fused kernels, and
the operations it leaves to ATen: convolutions, sort), read from that code; plus the two eager
operations around it (the batch of both views' images, the draw). On the CPU inductor writes C++ kernels, on a GPU Triton ones, and it may fuse differently
for each, so run it on the device in question.

    python benchmarks/augment_launches.py --device cpu --batch-size 256 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch._inductor.utils import run_and_get_code

from adios_pl.data.device_augment import DeviceAugmentation

from ops_per_step import CountOps  # benchmarks/ops_per_step.py

#: A call in the generated code's ``call`` function that launches work on the device.
KERNEL_CALL = re.compile(r"^\s*(?:\w+ = )?((?:cpp_fused|triton_)\w*|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)(?:\.run)?\(", re.M)


def compiled_calls(code: str) -> list[str]:
    """The kernel calls of the generated module's ``call`` function, in order."""
    body = code[code.index("def call("):]
    body = body[: body.index("\ndef ", 1)] if "\ndef " in body[1:] else body
    return [re.sub(r"_\d+$", "", name) if name.startswith(("cpp_fused", "triton_")) else name for name in KERNEL_CALL.findall(body)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--stored-size", type=int, default=None, help="side of the stored images (default: image size)")
    parser.add_argument("--blur-prob", type=float, default=0.5)
    parser.add_argument("--solarization-prob", type=float, default=0.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    stored = args.stored_size or args.image_size
    images = torch.randint(0, 256, (args.batch_size, 3, stored, stored), dtype=torch.uint8, device=device)
    settings = dict(blur_prob=args.blur_prob, solarization_prob=args.solarization_prob)
    augmentation = DeviceAugmentation(args.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), **settings)  # type: ignore[arg-type]
    augmentation(images)  # constants to the device
    with CountOps() as counted:
        augmentation(images)
    both = torch.cat([images, images])  # forward's two views, as one batch
    draws = augmentation.draw(both.shape[0])
    compiled = torch.compile(augmentation.transform, dynamic=False)
    _, codes = run_and_get_code(compiled, both, draws)
    calls = [call for code in codes for call in compiled_calls(code)]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch_size": args.batch_size,
        "image_size": args.image_size, "stored_size": stored, **settings, "torch": torch.__version__,
        "eager_kernel_ops": counted.kernels, "eager_ops": sum(counted.ops.values()),
        "compiled_kernel_calls": len(calls) + 2, "compiled_calls": ["cat (both views' images)", "draw (torch.rand)"] + [c[:48] for c in calls],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
