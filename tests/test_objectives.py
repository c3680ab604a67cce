"""Objectives: heads, losses against naive loops, the interface."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import VICRegLoss
from torch import nn

from adios_pl import ADIOSModule
from adios_pl.encoders import SmallConvNet
from adios_pl.objectives import BYOL, SimCLR, SimSiam, byol_loss, momentum_tau, simsiam_loss

from conftest import make_loader, quiet_trainer


def naive_ntxent(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """NT-Xent over the 2B samples, one anchor at a time."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / (2 * n)


def test_simclr_loss_equals_naive_loop() -> None:
    obj = SimCLR(temperature=0.3)
    obj.build(SmallConvNet(width=8))
    a, b = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    assert math.isclose(obj.loss({"z": a}, {"z": b}).item(), naive_ntxent(a, b, 0.3), rel_tol=1e-9)


def test_simclr_projector_is_reference_layout() -> None:
    obj = SimCLR(proj_hidden_dim=2048, proj_output_dim=128)
    obj.build(SmallConvNet(width=8))
    layers = list(obj.projector.layers)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (64, 2048, 128)


def test_byol_and_simsiam_losses() -> None:
    p, z = torch.randn(4, 8), torch.randn(4, 8)
    naive = sum(2 - 2 * float(p[i] @ z[i]) / float(p[i].norm() * z[i].norm()) for i in range(4)) / 4
    assert math.isclose(byol_loss(p, z).item(), naive, rel_tol=1e-5)
    assert math.isclose(simsiam_loss(p, z).item(), (naive - 2) / 2, rel_tol=1e-5)
    pp, zz = p.clone().requires_grad_(), z.clone().requires_grad_()
    simsiam_loss(pp, zz).backward()
    assert pp.grad is not None and zz.grad is None  # stop-gradient on the target


def test_byol_builds_frozen_momentum_copies() -> None:
    enc = SmallConvNet(width=8)
    obj = BYOL(proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32)
    obj.build(enc)
    assert not any(p.requires_grad for p in obj.momentum_encoder.parameters())
    assert not any(p.requires_grad for p in obj.momentum_projector.parameters())
    trainable = set(map(id, obj.trainable_parameters()))
    assert trainable == {id(p) for p in [*obj.projector.parameters(), *obj.predictor.parameters()]}
    out = obj(enc, torch.randn(4, 3, 16, 16))
    assert out["p"].requires_grad and not out["z_bar"].requires_grad


def test_byol_tau_schedule() -> None:
    # the reference: batch t uses the cosine at t - 1 over total_steps, base at batches 0 and 1
    assert momentum_tau(0, 100, 0.99, 1.0) == momentum_tau(1, 100, 0.99, 1.0) == 0.99
    assert abs(momentum_tau(51, 100, 0.99, 1.0) - 0.995) < 1e-12
    assert momentum_tau(101, 100, 0.99, 1.0) == 1.0
    assert abs(momentum_tau(26, 100, 0.99, 1.0) - (1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)) < 1e-12


def test_simsiam_loss_of_one_pair_is_the_papers_symmetric_loss() -> None:
    """``(D(p_c, z_m) + D(p_m, z_c)) / 2`` with ``D(p, z) = -cos(p, stopgrad(z))`` (SimSiam,
    Algorithm 1), one sample at a time: the loss when only ``views[1]`` is masked."""
    p_c, z_c, p_m, z_m = (torch.randn(5, 8, dtype=torch.float64, requires_grad=True) for _ in range(4))

    def d(p: torch.Tensor, z: torch.Tensor) -> float:
        p, z = p.detach(), z.detach()
        return -float(p @ z) / float(p.norm() * z.norm())

    naive = sum(d(p_c[i], z_m[i]) / 2 + d(p_m[i], z_c[i]) / 2 for i in range(5)) / 5
    loss = SimSiam().loss({"p": p_c, "z": z_c}, {"p": p_m, "z": z_m})
    assert math.isclose(loss.item(), naive, rel_tol=1e-12)
    loss.backward()
    assert p_c.grad is not None and p_m.grad is not None and z_c.grad is None and z_m.grad is None


def test_simsiam_heads() -> None:
    obj = SimSiam(proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=8)
    obj.build(SmallConvNet(width=8))
    out = obj(SmallConvNet(width=8), torch.randn(4, 3, 16, 16))
    assert out["z"].shape == (4, 32) and out["p"].shape == (4, 32)
    assert isinstance(obj.projector.layers[-1], nn.BatchNorm1d) and not obj.projector.layers[-1].affine


@pytest.mark.parametrize("batch", [2, 7, 64])
def test_nt_xent_equals_lightly_ntxent_loss_with_gradients(batch: int) -> None:
    """Our masked NT-Xent (no boolean indexing, so no read-back on a GPU) against lightly's."""
    from lightly.loss import NTXentLoss

    from adios_pl.objectives.simclr import nt_xent

    g = torch.Generator().manual_seed(batch)
    z0 = torch.randn(batch, 16, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(batch, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ours, theirs = nt_xent(z0, z1, 0.2), NTXentLoss(temperature=0.2)(z0, z1)
    # float64: observed differences <= 3e-17
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [z0, z1]), torch.autograd.grad(theirs, [z0, z1])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_nt_xent_of_several_views_is_the_sum_of_lightly_losses() -> None:
    """``nt_xent(z0, stacked)`` (what ``SimCLR.terms_loss`` computes for masked_views="batched")
    against lightly's loss of each view in turn, added up."""
    from lightly.loss import NTXentLoss

    from adios_pl.objectives.simclr import nt_xent

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    views = torch.randn(3, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z0, views, 0.3)
    theirs = sum(NTXentLoss(temperature=0.3)(z0, views[t]) for t in range(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [z0, views]), torch.autograd.grad(theirs, [z0, views])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    simclr = SimCLR()
    clean = [{"z": z0}]
    terms = [[{"z": views[t]}] for t in range(3)]
    torch.testing.assert_close(simclr.terms_loss(clean, terms), nt_xent(z0, views, simclr.temperature))


def _example_objective() -> type:
    """The ``VICReg`` objective of ``examples/custom_objective.py``: what a user writes."""
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_objective.py"
    spec = importlib.util.spec_from_file_location("custom_objective_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.VICReg  # type: ignore[no-any-return]


@pytest.mark.parametrize("masked_views", ["sequential", "batched"])
def test_a_users_objective_trains_on_the_sum_of_its_masked_terms(masked_views: str) -> None:
    """A user's objective (the README's example, VICReg with a batch-norm head) plugs in: the
    step's encoder loss is ``sum_n L(x1, x2 * (1 - m_n))`` written out here with the objective's
    own heads and loss, the masks from the mask generator before the step (float64, so that only
    a wrong composition can differ); both players and the user's heads are updated."""
    torch.manual_seed(0)
    model = ADIOSModule(encoder="small_cnn", objective=_example_objective()(hidden_dim=32, output_dim=16), num_masks=3,
                        image_size=16, mask_width=8, optimizer="sgd", lr=0.1, mask_lr=0.1, warmup_epochs=0,
                        masked_views=masked_views).double()
    before = copy.deepcopy(model)
    loader = make_loader(n=8, batch_size=8, size=16, dtype=torch.float64)
    (x1, x2), _ = next(iter(loader))
    with torch.no_grad():
        masks = before.mask_generator(x2)
        clean = before.objective.projector(before.encoder(x1))
        expected = sum(VICRegLoss()(clean, before.objective.projector(before.encoder(x2 * (1 - masks[:, n : n + 1]))))
                       for n in range(3))
    trainer = quiet_trainer(max_steps=1, precision="64-true", log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    logged = trainer.callback_metrics["train/encoder_loss"]
    assert torch.isclose(logged.double(), expected, rtol=1e-9, atol=0), (float(logged), float(expected))
    for part in ("encoder", "mask_generator"):
        moved = [not torch.equal(a, b) for a, b in zip(getattr(model, part).parameters(), getattr(before, part).parameters())]
        assert all(moved), f"{part}: {moved.count(False)} of {len(moved)} parameters did not move"
    head = [not torch.equal(a, b) for a, b in zip(model.objective.projector.parameters(), before.objective.projector.parameters())]
    assert all(head), f"the user's projector: {head.count(False)} of {len(head)} parameters did not move"
