"""SimSiam: predict the stop-gradient projection of the other view, both ways.

- [0] SimSiam, 2021, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead
from torch import Tensor, nn

from adios_pl.objectives.base import Objective, ViewOutput


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """Negative cosine similarity ``-mean_b cos(p_b, stopgrad(z_b))``; both ``(B, D)``."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class SimSiam(Objective):
    """SimSiam with the published heads (3-layer BN projector, bottleneck predictor).

    By default only ``views[1]`` is masked, as for SimCLR and BYOL, and the loss of one slot is
    ``(D(p_c, z_m) + D(p_m, z_c)) / 2`` (``c`` clean ``views[0]``, ``m`` masked ``views[1]``,
    stop-gradient on every ``z``).

    With ``mask_both_views=True`` the reference's SimSiam-ADIOS objective is used: each view is
    masked with masks predicted from itself, and the loss of one slot is the mean of the pairs
    ``D(p1m, z2), D(p2m, z1)`` (always), ``D(p2, z1m), D(p1, z2m)`` (``use_symmetry_mask``),
    ``D(p1, z2), D(p2, z1)`` (``use_no_mask``) and ``D(p1m, z2m), D(p2m, z1m)``
    (``use_both_mask``). The mask penalties then cover the 2N masks of both views.

    Args:
        proj_hidden_dim: Projector hidden width (2048).
        proj_output_dim: Projector output width (2048; 256 for STL10 ResNet18 in the paper).
        pred_hidden_dim: Predictor bottleneck width (512).
        mask_both_views: Mask both views, as the reference does.
        use_symmetry_mask: Add the masked-target pairs (needs ``mask_both_views``).
        use_no_mask: Add the plain SimSiam pairs (needs ``mask_both_views``).
        use_both_mask: Add the pairs with both sides masked (needs ``mask_both_views``).
        constant_predictor_lr: Hold the predictor's learning rate at the base rate instead of
            scheduling it (the SimSiam paper's choice and the reference's).
    """

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        pred_hidden_dim: int = 512,
        mask_both_views: bool = False,
        use_symmetry_mask: bool = False,
        use_no_mask: bool = False,
        use_both_mask: bool = False,
        constant_predictor_lr: bool = False,
    ) -> None:
        super().__init__()
        flags = {"use_symmetry_mask": use_symmetry_mask, "use_no_mask": use_no_mask, "use_both_mask": use_both_mask}
        if not mask_both_views and any(flags.values()):
            on = ", ".join(k for k, v in flags.items() if v)
            raise ValueError(f"{on} select loss pairs of the two masked views; they need mask_both_views=True")
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_output_dim = proj_output_dim
        self.pred_hidden_dim = pred_hidden_dim
        self.mask_both_views = mask_both_views
        self.use_symmetry_mask = use_symmetry_mask
        self.use_no_mask = use_no_mask
        self.use_both_mask = use_both_mask
        self.constant_predictor_lr = constant_predictor_lr

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

    def loss_both(self, clean: Sequence[ViewOutput], masked: Sequence[ViewOutput]) -> Tensor:
        """The reference's loss of one slot with both views masked: the mean of the chosen pairs."""
        (c1, c2), (m1, m2) = clean, masked
        pairs = [(m1, c2), (m2, c1)]
        if self.use_symmetry_mask:
            pairs += [(c2, m1), (c1, m2)]
        if self.use_no_mask:
            pairs += [(c1, c2), (c2, c1)]
        if self.use_both_mask:
            pairs += [(m1, m2), (m2, m1)]
        return torch.stack([simsiam_loss(a["p"], b["z"]) for a, b in pairs]).mean()

    def constant_lr_parameters(self) -> list[nn.Parameter]:
        """The predictor, when ``constant_predictor_lr``."""
        return list(self.predictor.parameters()) if self.constant_predictor_lr else []
