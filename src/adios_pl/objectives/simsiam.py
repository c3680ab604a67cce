"""SimSiam: predict the stop-gradient projection of the other view, both ways.

- [0] SimSiam, 2021, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

import torch.nn.functional as F
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead
from torch import Tensor, nn

from adios_pl.objectives.base import Objective, ViewOutput


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """Negative cosine similarity ``-mean_b cos(p_b, stopgrad(z_b))``; both ``(B, D)``."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class SimSiam(Objective):
    """SimSiam with the published heads (3-layer BN projector, bottleneck predictor).

    Loss for one (clean, masked) pair: ``(D(p_c, z_m) + D(p_m, z_c)) / 2`` with stop-gradient on
    the targets. Unlike the reference, which masks both views with masks predicted from each,
    the clean view stays unmasked here as for SimCLR and BYOL, so one mask network forward per
    batch serves every objective.

    Args:
        proj_hidden_dim: Projector hidden width (2048).
        proj_output_dim: Projector output width (2048; 256 for STL10 in the paper).
        pred_hidden_dim: Predictor bottleneck width (512).
    """

    def __init__(self, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048, pred_hidden_dim: int = 512) -> None:
        super().__init__()
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_output_dim = proj_output_dim
        self.pred_hidden_dim = pred_hidden_dim

    def build(self, encoder: nn.Module) -> None:
        """Create the projector and predictor for ``encoder.num_features`` inputs."""
        d = int(getattr(encoder, "num_features"))
        self.projector = SimSiamProjectionHead(d, self.proj_hidden_dim, self.proj_output_dim)
        self.predictor = SimSiamPredictionHead(self.proj_output_dim, self.pred_hidden_dim, self.proj_output_dim)

    def forward(self, encoder: nn.Module, images: Tensor) -> ViewOutput:
        """``{"features", "z", "p"}`` for one view."""
        features = encoder(images)
        z = self.projector(features)
        return {"features": features, "z": z, "p": self.predictor(z)}

    def loss(self, clean: ViewOutput, masked: ViewOutput) -> Tensor:
        """Symmetric SimSiam loss of one view pair."""
        return 0.5 * (simsiam_loss(clean["p"], masked["z"]) + simsiam_loss(masked["p"], clean["z"]))
