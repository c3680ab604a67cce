"""Plug your own SSL objective into ADIOS: VICReg with lightly's loss, on the Shapes data.

An objective owns its heads and its loss between a clean view and a masked view:

- ``build(encoder)``: create the heads for ``encoder.num_features`` (called by ADIOSModule);
- ``forward(encoder, images)``: a dict of tensors for one view, ``"features"`` among them;
- ``loss(clean, masked)``: a scalar; each view pair's loss must not depend on other pairs,
  so that ADIOS can back-propagate the N masked terms one at a time.

    python examples/custom_objective.py
"""

from __future__ import annotations

import pytorch_lightning as pl
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from adios_pl import ADIOSModule
from adios_pl.data import ShapesDataModule
from adios_pl.objectives import Objective, ViewOutput


class VICReg(Objective):
    """VICReg (Bardes et al., 2022) between the clean view and each masked view."""

    def __init__(self, hidden_dim: int = 512, output_dim: int = 512) -> None:
        super().__init__()
        self.hidden_dim, self.output_dim = hidden_dim, output_dim
        self.criterion = VICRegLoss()

    def build(self, encoder: nn.Module) -> None:
        self.projector = VICRegProjectionHead(int(encoder.num_features), self.hidden_dim, self.output_dim)

    def forward(self, encoder: nn.Module, images: Tensor) -> ViewOutput:
        features = encoder(images)
        return {"features": features, "z": self.projector(features)}

    def loss(self, clean: ViewOutput, masked: ViewOutput) -> Tensor:
        loss: Tensor = self.criterion(clean["z"], masked["z"])
        return loss


def main() -> None:
    model = ADIOSModule(encoder="small_cnn", objective=VICReg(), num_masks=4, image_size=32, mask_width=8,
                        optimizer="adamw", lr=2e-3, mask_lr=1e-3, warmup_epochs=0)
    data = ShapesDataModule(train_size=1024, batch_size=64)
    pl.Trainer(accelerator="cpu", max_steps=20, limit_val_batches=0).fit(model, datamodule=data)


if __name__ == "__main__":
    main()
