"""BYOL: predict the momentum network's projection of the other view, both ways.

- [0] BYOL, 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from adios_pl.objectives.base import Objective, ViewOutput


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_b (2 - 2 cos(p_b, z_b))`` for predictions ``p`` and targets ``z``, both ``(B, D)``."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()


def _mlp(d_in: int, hidden: int, d_out: int, batch_norm: bool) -> ProjectionHead:
    norm = nn.BatchNorm1d(hidden) if batch_norm else None
    return ProjectionHead([(d_in, hidden, norm, nn.ReLU()), (hidden, d_out, None, None)])


class BYOL(Objective):
    """BYOL with the reference's heads and a momentum encoder + projector.

    Loss for one (clean, masked) pair: ``byol(p(clean), z_bar(masked)) + byol(p(masked),
    z_bar(clean))``, the targets ``z_bar`` from the momentum branch without gradient. The momentum
    networks move after both players have stepped (as the reference's ``on_train_batch_end``),
    with tau on a cosine from ``base_tau`` to ``final_tau`` over the training *batches*
    (:func:`momentum_tau`).

    Args:
        proj_hidden_dim: Projector hidden width (4096).
        proj_output_dim: Projector output width (256).
        pred_hidden_dim: Predictor hidden width (8192 in the ADIOS reference).
        base_tau: Momentum at the first batch.
        final_tau: Momentum at the last batch.
        batch_norm: BatchNorm in the heads (as published). ``False`` makes every sample's loss
            independent of the batch, which distributed equality tests on the CPU need.
    """

    def __init__(
        self,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 8192,
        base_tau: float = 0.99,
        final_tau: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= base_tau <= final_tau <= 1.0:
            raise ValueError(f"need 0 <= base_tau <= final_tau <= 1, got base_tau={base_tau}, final_tau={final_tau}")
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_output_dim = proj_output_dim
        self.pred_hidden_dim = pred_hidden_dim
        self.base_tau = base_tau
        self.final_tau = final_tau
        self.batch_norm = batch_norm
        self.tau = base_tau

    def build(self, encoder: nn.Module) -> None:
        """Create projector, predictor and the momentum copies of encoder and projector."""
        d = int(getattr(encoder, "num_features"))
        self.projector = _mlp(d, self.proj_hidden_dim, self.proj_output_dim, self.batch_norm)
        self.predictor = _mlp(self.proj_output_dim, self.pred_hidden_dim, self.proj_output_dim, self.batch_norm)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        deactivate_requires_grad(self.momentum_encoder)
        deactivate_requires_grad(self.momentum_projector)

    def forward(self, encoder: nn.Module, images: Tensor) -> ViewOutput:
        """``{"features", "p"}`` with gradient and ``"z_bar"`` (momentum target) without."""
        features = encoder(images)
        p = self.predictor(self.projector(features))
        with torch.no_grad():
            z_bar = self.momentum_projector(self.momentum_encoder(images))
        return {"features": features, "p": p, "z_bar": z_bar}

    def loss(self, clean: ViewOutput, masked: ViewOutput) -> Tensor:
        """Symmetric BYOL loss of one view pair."""
        return byol_loss(clean["p"], masked["z_bar"]) + byol_loss(masked["p"], clean["z_bar"])

    def on_step_end(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Move the momentum networks toward the online ones after batch ``step`` (both players).

        As in the reference, the first batch makes no momentum update, and batch ``t`` uses the
        tau computed after batch ``t - 1``. Tau is a pure function of the batch index, so a
        resumed run continues it exactly.
        """
        if step == 0:
            return
        self.tau = momentum_tau(step, total_steps, self.base_tau, self.final_tau)
        update_momentum(encoder, self.momentum_encoder, m=self.tau)
        update_momentum(self.projector, self.momentum_projector, m=self.tau)


def momentum_tau(step: int, total_steps: int, base_tau: float, final_tau: float) -> float:
    """The momentum used at batch ``step``: the reference's cosine evaluated at ``step - 1``.

    ``final_tau - (final_tau - base_tau) * (cos(pi * k / total_steps) + 1) / 2`` with
    ``k = step - 1`` (``base_tau`` at batches 0 and 1, approaching ``final_tau`` at the end).
    """
    k = min(max(step - 1, 0), total_steps)
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2
