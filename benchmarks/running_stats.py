"""How much the lean step's BatchNorm running statistics differ from the reference's.

ADIOSModule encodes the clean view once per step; the reference re-encodes it for every mask in
both players, so its BatchNorm layers see the clean batch 2N times as often and their running
statistics differ (parameters do not: ``tests/test_exactness.py``). This trains the same start
with ADIOSModule and with the oracle of ``tests/oracle.py`` (float64, SimCLR, N masks, one batch
per epoch), then compares the encoders' running means/variances and their eval-mode features on
held-out images.

    python benchmarks/running_stats.py --steps 20 --masks 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_exactness  # noqa: E402  (the same harness as the exactness tests)

from conftest import TwoViewTensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--masks", type=int, default=4)
    args = parser.parse_args()
    model, oracle = test_exactness.run_both("simclr", num_masks=args.masks, epochs=args.steps, return_modules=True)
    stats = {}
    for (name, a), b in zip(model.encoder.named_buffers(), oracle.encoder.buffers()):
        if name.endswith(("running_mean", "running_var")):
            stats[name] = float((a - b).norm() / b.norm())
    held_out = TwoViewTensors(64, test_exactness.SIZE, seed=99).x1.double()
    model.encoder.eval(), oracle.encoder.eval()
    with torch.no_grad():
        fast, slow = model.encoder(held_out), oracle.encoder(held_out)
    params = float((torch.cat([p.reshape(-1) for p in model.encoder.parameters()]) - torch.cat([p.reshape(-1) for p in oracle.encoder.parameters()])).norm())
    print(f"SimCLR, N={args.masks}, {args.steps} steps, float64: parameter difference {params:.1e}")
    print(f"running statistics, relative difference: max {max(stats.values()):.3f}, mean {sum(stats.values()) / len(stats):.3f} over {len(stats)} buffers")
    print(f"eval-mode features of 64 held-out images, relative difference: {float((fast - slow).norm() / slow.norm()):.4f}")
    cos = torch.nn.functional.cosine_similarity(fast, slow, dim=1)
    print(f"cosine similarity per image: min {float(cos.min()):.4f}, mean {float(cos.mean()):.4f}")


if __name__ == "__main__":
    main()
