"""Host time of one batch-norm layer over V batched views, forward and backward, two ways.

With tiny tensors the kernels cost next to nothing, so what is timed is what the host pays per
layer: Python, dispatch and autograd. That is what a launch-bound GPU step pays too (on top of
the launches themselves, which ``ops_per_step.py`` counts). The two ways compute the same:
- ``function``: ``adios_pl.batched_views``' autograd function (each view normalised into its
  slice of one output; one Python forward and backward per layer);
- ``cat``: the layer's own forward once per view, joined by ``cat`` (autograd in C++).

    python benchmarks/bn_host_time.py --views 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

import adios_pl.batched_views as batched_views


def per_call_us(step: Callable[[], None], calls: int, rounds: int) -> list[float]:
    """Microseconds per call, one figure per round."""
    figures = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        figures.append((time.perf_counter() - start) / calls * 1e6)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for views in args.views:
        layer = nn.BatchNorm2d(8)
        x = torch.randn(2 * views, 8, 2, 2, requires_grad=True)
        grad = torch.randn_like(x)

        def step() -> None:
            layer(x).backward(grad)

        ways: dict[str, list[float]] = {"function": [], "cat": []}
        saved = batched_views.MIN_VIEWS_FOR_FUNCTION
        batched_views.MIN_VIEWS_FOR_FUNCTION = 2  # time the function at every count
        try:
            with batched_views.batch_norm_per_view([layer], views):
                for round_ in range(args.rounds + 1):  # the ways alternate, round by round; round 0 warms up
                    for way in ways:
                        batched_views.PER_VIEW_FUNCTION = way == "function"
                        figure = per_call_us(step, args.calls, 1)
                        if round_:
                            ways[way] += figure
        finally:
            batched_views.PER_VIEW_FUNCTION, batched_views.MIN_VIEWS_FOR_FUNCTION = True, saved
        entry = {"views": views, **{f"{way}_median_us": round(statistics.median(v), 1) for way, v in ways.items()},
                 **{f"{way}_min_us": round(min(v), 1) for way, v in ways.items()}}
        results.append(entry)
        print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
