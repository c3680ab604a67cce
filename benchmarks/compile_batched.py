"""What ``torch.compile`` makes of the encoder with batched views: compile time and kernels.

One forward and backward of ResNet18 with ``views`` views stacked under per-view batch norm
(``adios_pl.batched_views``), compiled by inductor from an empty cache, in a fresh process per
setting: batch norm in the grouped form the compiler sees now (one reduction over all views per
layer, ``--bn grouped``), or one forward per view joined by ``cat`` (``--bn per-view``, the form
before it); ``views=1`` is the sequential step's graph. Prints one JSON line per setting: the
seconds to compile and run the first step, the kernels inductor generated
(``torch._inductor.metrics.generated_kernel_count``), and the graphs' operations.

    python benchmarks/compile_batched.py --device cpu --views 1 5 --bn grouped per-view \\
        --out benchmarks/results/compile_batched_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(device: str, views: int, bn: str, image_size: int, batch: int) -> dict[str, object]:
    import torch
    import torch._inductor.metrics as metrics

    import adios_pl.batched_views as batched_views
    from adios_pl.encoders import create_encoder

    if bn == "per-view":  # the form before the grouped one: a forward per view, joined by cat
        batched_views.PER_VIEW_FUNCTION = False
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", image_size).to(device)
    if device == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    operations = 0

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        nonlocal operations
        operations += sum(node.op == "call_function" for node in gm.graph.nodes)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)

    compiled = torch.compile(encoder, backend=counting)
    images = torch.randn(views * batch, 3, image_size, image_size, device=device)
    start = time.perf_counter()
    with batched_views.batch_norm_per_view([encoder], views):
        compiled(images).square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "device": device, "views": views, "bn": bn, "image_size": image_size, "batch": batch,
        "first_step_seconds": round(time.perf_counter() - start, 1),
        "generated_kernels": metrics.generated_kernel_count, "dynamo_graph_operations": operations,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--bn", nargs="+", choices=["grouped", "per-view"], default=["grouped", "per-view"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the settings' results to this JSON file as a list")
    parser.add_argument("--one", nargs=2, metavar=("VIEWS", "BN"), help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.device, int(args.one[0]), args.one[1], args.image_size, args.batch)), flush=True)
        return
    results = []
    for views in args.views:
        for bn in args.bn if views > 1 else ["grouped"]:
            with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache for each setting
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                child = subprocess.run([sys.executable, __file__, "--device", args.device, "--image-size", str(args.image_size),
                                        "--batch", str(args.batch), "--one", str(views), bn],
                                       env=env, check=True, stdout=subprocess.PIPE, text=True)
            line = child.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            results.append(json.loads(line))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
