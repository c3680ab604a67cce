"""BYOL: predict the momentum network's projection of the other view, both ways.

- [0] BYOL, 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
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
    tau follows a cosine from ``base_tau`` to ``final_tau`` over the training *batches*.

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

    def on_encoder_step_end(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Move the momentum networks toward the online ones with tau of batch ``step``.

        Tau is a pure function of the batch index, so a resumed run continues it exactly.
        """
        self.tau = momentum_tau(step, total_steps, self.base_tau, self.final_tau)
        update_momentum(encoder, self.momentum_encoder, m=self.tau)
        update_momentum(self.projector, self.momentum_projector, m=self.tau)


def momentum_tau(step: int, total_steps: int, base_tau: float, final_tau: float) -> float:
    """Cosine schedule of the momentum: ``base_tau`` at batch 0, ``final_tau`` at the last batch."""
    return float(cosine_schedule(min(step, total_steps), max(total_steps, 1), base_tau, final_tau))
