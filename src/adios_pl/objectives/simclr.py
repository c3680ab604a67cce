"""SimCLR: NT-Xent between the clean view and each masked view.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules.heads import ProjectionHead
import torch
from torch import Tensor, nn

from adios_pl.errors import ConfigurationError

from adios_pl.objectives.base import Objective, ViewOutput


class SimCLR(Objective):
    """SimCLR with the reference's projector ``Linear(d, hidden) -> ReLU -> Linear(hidden, out)``.

    The loss is NT-Xent over the 2B samples of (clean, masked). Under DDP the negatives are
    gathered from all ranks with gradients flowing back (lightly's ``gather_distributed``).

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
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)
        # Without a memory bank lightly keeps an empty buffer; it never reads it, and an empty
        # storage cannot be shared with spawned processes (ddp_spawn), so drop it.
        if getattr(self.criterion.memory_bank, "bank", None) is not None and self.criterion.memory_bank.bank.numel() == 0:
            del self.criterion.memory_bank.bank

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
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        if clean["z"].shape[0] * world < 2:
            raise ConfigurationError(
                "SimCLR needs at least 2 images per batch: its negatives are the other images, so with one "
                "the loss is 0 and nothing trains; raise batch_size"
            )
        loss: Tensor = self.criterion(clean["z"], masked["z"])
        return loss
