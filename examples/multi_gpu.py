"""ADIOS + BYOL on STL10 with 8 GPUs, bf16 and SyncBatchNorm, in an ordinary Lightning script.

    python examples/multi_gpu.py --data-dir /data/stl10 --devices 8
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.data import STL10DataModule
from adios_pl.objectives import BYOL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=400)
    args = parser.parse_args()

    pl.seed_everything(5)
    # The published STL10 / ResNet18 / BYOL setting, its rates and weights rounded, with STL10's own
    # normalisation (configs/stl10/byol_adios_resnet18.yaml has the exact values and the reference's
    # statistics); batch_size is per GPU.
    model = ADIOSModule(
        encoder="resnet18", objective=BYOL(proj_output_dim=256), num_masks=6, image_size=96,
        mask_width=64, mask_norm="gn", sparsity_weight=1.719, optimizer="lars", lr=0.292,
        mask_lr=0.093, weight_decay=1e-5, warmup_epochs=10, warmup_start_lr=0.003,
        schedule_interval="epoch",  # the reference steps its schedules once an epoch
        channels_last=True,
        # the clean and the 6 masked views of a batch through the encoder at once: the same
        # training with fewer kernel launches, for the activations of 7 views alive together
        masked_views="batched",
    )
    # augment_on="device": the loader ships uint8 images (decoded once into memory: about 3 GB per
    # process for STL10's 105k images) and the two views are made on each GPU.
    data = STL10DataModule(data_dir=args.data_dir, download=True, batch_size=128, num_workers=8, augment_on="device")
    trainer = pl.Trainer(
        accelerator="gpu", devices=args.devices, strategy="ddp", precision="bf16-mixed",
        sync_batchnorm=True, max_epochs=args.epochs, check_val_every_n_epoch=10,
        callbacks=[
            OnlineLinearProbe(num_classes=10), OnlineKNN(k=200, temperature=0.07),
            MaskVisualizer(every_n_epochs=10), ModelCheckpoint(save_last=True, every_n_train_steps=1000),
        ],
        plugins=[AtomicCheckpointIO()],  # a kill while saving keeps the previous checkpoint
    )
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main()
