"""Which inputs the graphs of a compiled training step mutate, on any device (the CPU included).

CUDA graph trees (``compile_encoder="reduce-overhead"``) replay a compiled graph only if every
input it mutates in place is a static input (a parameter or buffer, whose address does not
change); a graph that mutates another input is run without CUDA graphs, and the step loses the
replay silently. That is decided from records inductor keeps for every graph it compiles, on the
CPU too, so it can be checked without a GPU: this trains ``--steps`` steps with the encoder and the
mask generator compiled in ``"reduce-overhead"`` mode and prints, per compiled graph, its static
inputs, the inputs it mutates and those of them that are not static (none, for the graphs to
replay). The records are inductor's own (``CompiledFxGraph``), which is private and may change.

    python benchmarks/graph_mutations.py --encoder small_cnn --masked-views batched
    python benchmarks/graph_mutations.py --mask-mode one        # ADIOS-s; --update simultaneous likewise
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from torch._inductor import output_code
from torch.utils.data import DataLoader

from adios_pl import ADIOSModule


def record_compiled_graphs() -> list[dict[str, Any]]:
    """Record, from now on, each graph inductor compiles: its devices, static inputs and mutated inputs."""
    # graphs loaded from inductor's caches are not constructed, so compile them all afresh
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    records: list[dict[str, Any]] = []
    original = output_code.CompiledFxGraph.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        static = set((self.fx_kwargs or {}).get("static_input_idxs") or ())
        mutated = set(self.mutated_input_idxs)
        records.append({"devices": sorted(self.device_types), "static_inputs": len(static),
                        "mutated": sorted(mutated), "mutated_not_static": sorted(mutated - static)})

    output_code.CompiledFxGraph.__init__ = init  # type: ignore[method-assign]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--masked-views", default="batched", choices=["sequential", "batched"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--mask-mode", default="all", choices=["all", "one"], help="ADIOS (all) or ADIOS-s (one)")
    parser.add_argument("--update", default="alternating", choices=["alternating", "simultaneous"])
    args = parser.parse_args()
    records = record_compiled_graphs()
    pl.seed_everything(0)
    views = torch.rand(args.batch_size * args.steps, 2, 3, args.image_size, args.image_size)
    # ((view_1, view_2), target) per image, which the default collation turns into training batches
    samples = [((v[0], v[1]), -1) for v in views]  # a list serves as a map-style dataset
    loader: DataLoader[Any] = DataLoader(samples, batch_size=args.batch_size)  # type: ignore[arg-type]
    model = ADIOSModule(encoder=args.encoder, image_size=args.image_size, num_masks=4, mask_width=16, warmup_epochs=0,
                        masked_views=args.masked_views, mask_mode=args.mask_mode, update=args.update,
                        compile_encoder="reduce-overhead", compile_mask_generator="reduce-overhead")
    pl.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, loader)
    for i, record in enumerate(records):
        print(f"graph {i}: {record}")
    offending = sum(bool(r["mutated_not_static"]) for r in records)
    print(f"{len(records)} graphs compiled; {offending} mutate an input that is not static (CUDA graph trees would skip them)")
    sys.exit(1 if offending else 0)


if __name__ == "__main__":
    main()
