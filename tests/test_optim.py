"""LARS against the reference formula, and the warm-up + cosine factor."""

from __future__ import annotations

import math

import pytest
import torch

from adios_pl.optim import LARS, build_optimizer, warmup_cosine


def naive_lars_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list, lr: float, wd: float, eta: float) -> None:
    """The reference (solo-learn) LARS with clip_lr and exclude_bias_n_norm, per tensor, in floats."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.clone()
        if p.ndim != 1:
            pn, gn = float(p.norm()), float(g.norm())
            if pn != 0 and gn != 0:
                local = eta * pn / (gn + pn * wd + 1e-8)
                local = min(local / lr, 1.0)
                d = (d + wd * p) * local
        bufs[i] = d.clone() if bufs[i] is None else 0.9 * bufs[i] + d
        p -= lr * bufs[i]


def test_lars_equals_reference_formula() -> None:
    torch.manual_seed(0)
    params = [torch.randn(5, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
    mine = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS(mine, lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02)
    bufs: list = [None] * 3
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        grads[0] *= 1e-3  # |p| >> |g|: the trust ratio is clipped to 1
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        opt.step()
        naive_lars_step(params, grads, bufs, 0.5, 1e-2, 0.02)
    for a, b in zip(mine, params):
        assert torch.allclose(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_build_optimizer_names() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer("sgd", p, 0.1, 0.0), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", p, 0.1, 0.0), LARS)
    assert isinstance(build_optimizer("adamw", p, 0.1, 0.0), torch.optim.AdamW)
    with pytest.raises(ValueError, match="accepted"):
        build_optimizer("rmsprop", p, 0.1, 0.0)


def test_warmup_cosine() -> None:
    assert [warmup_cosine(k, 4, 10) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 10) == 1.0
    assert math.isclose(warmup_cosine(7, 4, 10), 0.5)
    assert warmup_cosine(10, 4, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(10, 4, 10, min_factor=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype,clip_lr", [(torch.float64, True), (torch.float32, True), (torch.float64, False)])
def test_foreach_lars_equals_the_weight_by_weight_update(dtype: torch.dtype, clip_lr: bool) -> None:
    """The multi-tensor update (default on CUDA) against the loop, over steps that include a
    clipped trust ratio, a zero weight (no scaling, no decay), zero gradients and the first
    momentum step."""

    def params() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(0)
        shapes = [(8, 4), (4,), (3, 3), (2, 3, 3, 3)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
        with torch.no_grad():
            ps[2].zero_()
        return ps

    loop, multi = params(), params()
    opts = [LARS(ps, lr=0.3, weight_decay=1e-4, clip_lr=clip_lr, foreach=f) for ps, f in ((loop, False), (multi, True))]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in loop]
        if step % 2 == 0:
            grads[3] = torch.zeros_like(grads[3])
        grads[0] *= 1e-3  # |p| >> |g|: with clip_lr the trust ratio is clipped to 1
        for ps in (loop, multi):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        for opt in opts:
            opt.step()
    for a, b in zip(loop, multi):
        # same operations in the same order: bit for bit
        assert torch.equal(a, b)
