"""A plain port of the reference ADIOS training step (YugeTen/adios, commit 21c6f23), for tests.

It shares no code with ``adios_pl``'s objectives, losses, optimisers or schedules: the heads,
NT-Xent, BYOL and SimSiam losses, the LARS wrapper, pl_bolts' chainable warm-up cosine, the
momentum updater and the order of updates are written here again, the way the reference writes
them (``src/methods/{simclr,byol,simsiam}_adios{,_s}.py``, ``src/methods/base{,_adios}.py``,
``src/utils/{lars,momentum}.py``). The encoder and the mask generator are taken as black boxes
(deep copies of the module's), so this checks the training algorithm, not their layers.

What it keeps from the reference, on purpose slow: the clean view is re-encoded for every mask
in both players, the mask generator runs once per player, each player makes one backward of its
whole loss. Where adios-pl differs from the reference by design (the ADIOS-s slot is drawn once
per batch rather than once per player), the oracle takes the slots as an argument.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------- losses
def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The reference's SimCLR loss: each of the 2B samples against its positive, others negative."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(2 * b, dtype=torch.bool)
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(dim=1, keepdim=True))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return -log_prob[torch.arange(2 * b), positive].mean()


def byol_pair(p: Tensor, z: Tensor) -> Tensor:
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_pair(p: Tensor, z: Tensor) -> Tensor:
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def sparsity(mask: Tensor) -> Tensor:
    """``1 / (sin(pi * area) + 1e-10)`` averaged over the batch, for one mask ``(B, 1, H, W)``."""
    area = mask.sum(dim=(-1, -2, -3)) / (mask.shape[-1] * mask.shape[-2])
    return (1 / (torch.sin(area * math.pi) + 1e-10)).mean(0)


def neg_entropy(areas: Tensor) -> Tensor:
    """``sum_b sum_n p log p`` with ``p = softmax_n(areas)``."""
    p = torch.softmax(areas, dim=1)
    return (p * torch.log(p)).sum()


# -------------------------------------------------------------------------------- optimiser
class ReferenceLARS:
    """The reference's LARS wrapper around SGD (eta 0.02, clipping, biases and norms excluded)."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float, eta: float = 0.02) -> None:
        self.optim = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.eta, self.eps = eta, 1e-8

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    def zero_grad(self) -> None:
        self.optim.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        decays = []
        for group in self.optim.param_groups:
            wd = group["weight_decay"]
            decays.append(wd)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is None or p.ndim == 1:
                    continue
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if p_norm != 0 and g_norm != 0:
                    new_lr = self.eta * p_norm / (g_norm + p_norm * wd + self.eps)
                    new_lr = min(float(new_lr) / group["lr"], 1.0)
                    p.grad += wd * p
                    p.grad *= new_lr
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd


class ReferenceWarmupCosine:
    """pl_bolts 0.4's ``LinearWarmupCosineAnnealingLR`` in its chainable form, stepped per epoch.

    ``static`` groups (the SimSiam predictor) keep their base rate once the scheduler has
    stepped; like the reference's patch, the first epoch still runs at ``warmup_start_lr``.
    """

    def __init__(self, optimizer: ReferenceLARS, warmup_epochs: int, max_epochs: int, warmup_start_lr: float,
                 eta_min: float = 0.0, static: Iterable[int] = ()) -> None:
        self.groups = optimizer.param_groups
        self.base = [g["lr"] for g in self.groups]
        self.w, self.m, self.start, self.eta_min = warmup_epochs, max_epochs, warmup_start_lr, eta_min
        self.static = set(static)
        self.epoch = 0
        for g in self.groups:
            g["lr"] = warmup_start_lr

    def step(self) -> None:
        self.epoch += 1
        e, w, m = self.epoch, self.w, self.m
        for i, (g, base) in enumerate(zip(self.groups, self.base)):
            if i in self.static:
                g["lr"] = base
            elif e < w:
                g["lr"] = g["lr"] + (base - self.start) / (w - 1)
            elif e == w:
                g["lr"] = base
            elif (e - 1 - m) % (2 * (m - w)) == 0:
                g["lr"] = g["lr"] + (base - self.eta_min) * (1 - math.cos(math.pi / (m - w))) / 2
            else:
                g["lr"] = (1 + math.cos(math.pi * (e - w) / (m - w))) / (1 + math.cos(math.pi * (e - w - 1) / (m - w))) * (
                    g["lr"] - self.eta_min
                ) + self.eta_min


# ------------------------------------------------------------------------------------ heads
def _sequential(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def simclr_projector(d: int, hidden: int, out: int) -> nn.Module:
    return _sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))


def byol_mlp(d: int, hidden: int, out: int) -> nn.Module:
    # The reference's first Linear has a bias; before a training-mode BatchNorm its gradient is
    # zero and LARS gives 1-D parameters no weight decay, so it never moves and changes nothing.
    return _sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


def simsiam_projector(d: int, hidden: int, out: int) -> nn.Module:
    # The reference's last Linear has a frozen bias; the affine-free BatchNorm after it removes
    # any constant, so it is left out here (as in lightly's head).
    return _sequential(
        nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False),
    )


def simsiam_predictor(d: int, hidden: int) -> nn.Module:
    return _sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d))


def load_from(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s parameters and buffers into ``dst`` in order (same shapes required)."""
    d, s = list(dst.state_dict().values()), list(src.state_dict().values())
    assert [t.shape for t in d] == [t.shape for t in s], "head layouts differ"
    with torch.no_grad():
        for a, b in zip(d, s):
            a.copy_(b)


# ------------------------------------------------------------------------------------- step
@dataclass
class Oracle:
    """The reference's game for one method, trained batch by batch with :meth:`train_batch`."""

    method: str  # "simclr", "byol" or "simsiam"
    encoder: nn.Module
    mask_generator: nn.Module | None
    heads: dict[str, nn.Module]
    num_masks: int
    alpha_sparsity: float
    alpha_entropy: float
    lr: float
    mask_lr: float
    weight_decay: float
    warmup_epochs: int
    max_epochs: int
    batches_per_epoch: int
    warmup_start_lr: float = 0.003
    temperature: float = 0.2
    flags: tuple[bool, bool, bool] = (True, True, True)  # SimSiam: symmetry, no_mask, both_mask
    static_predictor: bool = True
    base_tau: float = 0.99
    final_tau: float = 1.0
    step_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        groups = [{"params": list(self.encoder.parameters()) + list(self.heads["projector"].parameters())}]
        static = []
        if "predictor" in self.heads:
            groups.append({"params": list(self.heads["predictor"].parameters())})
            if self.method == "simsiam" and self.static_predictor:
                static.append(1)
        self.opt_i = ReferenceLARS(groups, self.lr, self.weight_decay)
        self.sch_i = ReferenceWarmupCosine(self.opt_i, self.warmup_epochs, self.max_epochs, self.warmup_start_lr, static=static)
        if self.mask_generator is not None:
            self.opt_m = ReferenceLARS([{"params": list(self.mask_generator.parameters())}], self.mask_lr, self.weight_decay)
            self.sch_m = ReferenceWarmupCosine(self.opt_m, self.warmup_epochs, self.max_epochs, self.warmup_start_lr)
        if self.method == "byol":
            self.momentum_encoder = copy.deepcopy(self.encoder)
            self.momentum_projector = copy.deepcopy(self.heads["projector"])
            self.cur_tau, self.last_step = self.base_tau, 0

    # forward passes ------------------------------------------------------------------------
    def z(self, x: Tensor) -> Tensor:
        return self.heads["projector"](self.encoder(x))

    def p(self, z: Tensor) -> Tensor:
        return self.heads["predictor"](z)

    def target(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.momentum_projector(self.momentum_encoder(x))

    def set_inpainter_grad(self, status: bool) -> None:
        for module in (self.encoder, *self.heads.values()):
            for param in module.parameters():
                param.requires_grad = status

    # losses of one mask --------------------------------------------------------------------
    def single_view_loss(self, x1: Tensor, x2_masked: Tensor) -> Tensor:
        if self.method == "simclr":
            return nt_xent(self.z(x1), self.z(x2_masked), self.temperature)
        z1, z2 = self.z(x1), self.z(x2_masked)
        return byol_pair(self.p(z1), self.target(x2_masked)) + byol_pair(self.p(z2), self.target(x1))

    def both_views_loss(self, x1: Tensor, x2: Tensor, m1: Tensor | None, m2: Tensor | None) -> Tensor:
        z1, z2 = self.z(x1), self.z(x2)
        p1, p2 = self.p(z1), self.p(z2)
        if m1 is None or m2 is None:  # the baseline: plain SimSiam
            return 0.5 * (simsiam_pair(p1, z2) + simsiam_pair(p2, z1))
        z1m, z2m = self.z(x1 * (1 - m1)), self.z(x2 * (1 - m2))
        p1m, p2m = self.p(z1m), self.p(z2m)
        terms = [simsiam_pair(p1m, z2), simsiam_pair(p2m, z1)]
        symmetry, no_mask, both_mask = self.flags
        if symmetry:
            terms += [simsiam_pair(p2, z1m), simsiam_pair(p1, z2m)]
        if no_mask:
            terms += [simsiam_pair(p1, z2), simsiam_pair(p2, z1)]
        if both_mask:
            terms += [simsiam_pair(p1m, z2m), simsiam_pair(p2m, z1m)]
        return torch.stack(terms).mean()

    def chunks(self, masks: Tensor, slots: Tensor | None) -> list[Tensor]:
        """The masks of each term: ``torch.chunk`` over slots (ADIOS) or the drawn slot (ADIOS-s)."""
        if slots is None:
            return list(torch.chunk(masks, self.num_masks, dim=1))
        return [torch.stack([masks[i, c] for i, c in enumerate(slots.tolist())]).unsqueeze(1)]

    def ssl_and_penalty(self, x1: Tensor, x2: Tensor, slots: Tensor | None, detach: bool) -> tuple[Tensor, Tensor]:
        """Sum over masks of the SSL loss; and the mask penalties (sparsity minus entropy part)."""
        assert self.mask_generator is not None
        if self.method != "simsiam":
            masks = self.mask_generator(x2)
            masks = masks.detach() if detach else masks
            loss = sum(self.single_view_loss(x1, x2 * (1 - m)) for m in self.chunks(masks, slots))
            pen = sum(sparsity(m) for m in torch.chunk(masks, self.num_masks, dim=1))
            ent = neg_entropy(masks.mean(dim=(2, 3)))
            return loss, self.alpha_sparsity * pen - self.alpha_entropy * ent  # type: ignore[return-value]
        masks1, masks2 = self.mask_generator(x1), self.mask_generator(x2)
        if detach:
            masks1, masks2 = masks1.detach(), masks2.detach()
        pairs = list(zip(self.chunks(masks1, slots), self.chunks(masks2, slots)))
        loss = sum(self.both_views_loss(x1, x2, m1, m2) for m1, m2 in pairs)
        pen = sum(sparsity(m) for ms in (masks1, masks2) for m in torch.chunk(ms, self.num_masks, dim=1))
        # ADIOS: the entropy over the 2N areas of both views (ADIOS-s in the reference takes it
        # per view; the tests use alpha_entropy = 0 there).
        ent = neg_entropy(torch.cat([masks1.mean(dim=(2, 3)), masks2.mean(dim=(2, 3))], dim=1))
        return loss, self.alpha_sparsity * pen - self.alpha_entropy * ent  # type: ignore[return-value]

    # one batch -----------------------------------------------------------------------------
    def train_batch(self, x1: Tensor, x2: Tensor, slots: Tensor | None = None) -> None:
        """The reference's ``training_step`` and ``on_train_batch_end`` for one batch."""
        last_batch = (self.step_count + 1) % self.batches_per_epoch == 0
        # inpainter: masks detached, one backward of the sum over masks
        self.set_inpainter_grad(True)
        self.opt_i.zero_grad()
        if self.mask_generator is None:
            if self.method == "simsiam":
                loss = self.both_views_loss(x1, x2, None, None)
            else:
                loss = self.single_view_loss(x1, x2)
        else:
            loss, _ = self.ssl_and_penalty(x1, x2, slots, detach=True)
        loss.backward()
        self.opt_i.step()
        if last_batch:
            self.sch_i.step()
        # mask model: inpainter frozen, ascend the SSL loss minus the penalties
        if self.mask_generator is not None:
            self.set_inpainter_grad(False)
            self.opt_m.zero_grad()
            ssl, penalty = self.ssl_and_penalty(x1, x2, slots, detach=False)
            (-(ssl - penalty)).backward()
            self.opt_m.step()
            if last_batch:
                self.sch_m.step()
            self.set_inpainter_grad(True)
        # on_train_batch_end: momentum update with the tau of the previous batch
        self.step_count += 1
        if self.method == "byol":
            global_step = self.step_count - 1  # Lightning 1.4 increments after this hook
            if global_step > self.last_step:
                with torch.no_grad():
                    for online, momentum in ((self.encoder, self.momentum_encoder), (self.heads["projector"], self.momentum_projector)):
                        for op, mp in zip(online.parameters(), momentum.parameters()):
                            mp.data = self.cur_tau * mp.data + (1 - self.cur_tau) * op.data
                max_steps = self.batches_per_epoch * self.max_epochs
                self.cur_tau = self.final_tau - (self.final_tau - self.base_tau) * (math.cos(math.pi * global_step / max_steps) + 1) / 2
            self.last_step = global_step
