"""SimCLR: NT-Xent between the clean view and each masked view.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.utils import dist
from torch import Tensor, nn

from adios_pl.errors import ConfigurationError
from adios_pl.objectives.base import Objective, ViewOutput


def nt_xent(z0: Tensor, z1: Tensor, temperature: float, gather_distributed: bool = True) -> Tensor:
    """NT-Xent (SimCLR's loss) of the pairs ``(z0[i], z1[i])`` against the other 2B - 2 samples.

    ``z1`` may also hold several views ``(T, B, D)`` to pair with ``z0`` ``(B, D)``: the result is
    then the sum of the T losses, computed at once (the similarities within ``z0`` once for all).

    With ``gather_distributed`` under DDP the negatives come from every rank (gradients flow
    back through lightly's ``gather``). The same loss as lightly's ``NTXentLoss``, but the
    self-similarities are masked with ``-inf`` rather than cut out by boolean indexing, which
    would read a count back from the GPU at every call.
    """
    terms, batch = (1 if z1.dim() == 2 else z1.shape[0]), z0.shape[0]
    z0, z1 = F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)
    if gather_distributed and dist.world_size() > 1:
        all0, all1, offset = torch.cat(dist.gather(z0)), torch.cat(dist.gather(z1), dim=-2), dist.rank() * batch
    else:
        all0, all1, offset = z0, z1, 0
    index = torch.arange(batch, device=z0.device) + offset
    itself = F.one_hot(index, all0.shape[0]).bool()  # each sample against itself in the same view
    sim_00 = (z0 @ all0.T / temperature).masked_fill(itself, float("-inf"))
    sim_11 = (z1 @ all1.transpose(-1, -2) / temperature).masked_fill(itself, float("-inf"))
    sim_01 = (all1 @ z0.T).transpose(-1, -2) / temperature  # one matrix product for all views
    sim_10 = z1 @ all0.T / temperature
    logits = torch.cat([torch.cat([sim_01, sim_00.expand_as(sim_01)], -1), torch.cat([sim_10, sim_11], -1)], -2)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), index.repeat(2 * terms))
    return loss * terms if terms > 1 else loss  # the mean over each view's 2B rows, summed over views


class SimCLR(Objective):
    """SimCLR with the reference's projector ``Linear(d, hidden) -> ReLU -> Linear(hidden, out)``.

    The loss is NT-Xent over the 2B samples of (clean, masked). Under DDP the negatives are
    gathered from all ranks with gradients flowing back (:func:`nt_xent`).

    Args:
        temperature: Softmax temperature tau.
        proj_hidden_dim: Hidden width of the projector.
        proj_output_dim: Output width of the projector (128; 256 for STL10 in the paper).
        gather_distributed: Use negatives from every rank.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_output_dim = proj_output_dim
        self.gather_distributed = gather_distributed

    def build(self, encoder: nn.Module) -> None:
        """Create the projector for ``encoder.num_features`` inputs."""
        d = int(getattr(encoder, "num_features"))
        self.projector = ProjectionHead(
            [(d, self.proj_hidden_dim, None, nn.ReLU()), (self.proj_hidden_dim, self.proj_output_dim, None, None)]
        )

    def forward(self, encoder: nn.Module, images: Tensor) -> ViewOutput:
        """``{"features", "z"}`` for one view."""
        features = encoder(images)
        return {"features": features, "z": self.projector(features)}

    def loss(self, clean: ViewOutput, masked: ViewOutput) -> Tensor:
        """NT-Xent between ``clean["z"]`` and ``masked["z"]``, both ``(B, out)``."""
        self._check_batch(clean["z"])
        return nt_xent(clean["z"], masked["z"], self.temperature, self.gather_distributed)

    def terms_loss(self, clean: Sequence[ViewOutput], terms: Sequence[Sequence[ViewOutput]]) -> Tensor:
        """The sum of the terms' NT-Xent losses, computed at once."""
        self._check_batch(clean[0]["z"])
        return nt_xent(clean[0]["z"], torch.stack([masked[0]["z"] for masked in terms]), self.temperature, self.gather_distributed)

    @staticmethod
    def _check_batch(z: Tensor) -> None:
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        if z.shape[0] * world < 2:
            raise ConfigurationError(
                "SimCLR needs at least 2 images per batch: its negatives are the other images, so with one "
                "the loss is 0 and nothing trains; raise batch_size"
            )
