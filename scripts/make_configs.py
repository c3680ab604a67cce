"""Write configs/: the published ADIOS settings (shared ADIOS.md table) and their baselines.

Run from the repository root: ``python scripts/make_configs.py``. The YAML files are committed;
this script is how they were made, so a changed setting is changed here and regenerated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# (data, encoder, method, epochs, batch, lr, mask_lr, a_s, a_e, N, width, norm, mode)
PUBLISHED = [
    ("imagenet100_s", "resnet18", "simclr", 500, 128, 0.111, 0.0145, 0.923, 0.712, 4, 32, "in", "all"),
    ("imagenet100_s", "resnet18", "byol", 500, 128, 0.241, 0.066, 0.404, 0.0, 6, 16, "gn", "all"),
    ("imagenet100_s", "resnet18", "simsiam", 500, 128, 0.847, 0.080, 0.200, 0.286, 4, 16, "gn", "all"),
    ("imagenet100_s", "vit_tiny", "simclr", 300, 128, 0.116, 0.0334, 0.889, 0.0, 6, 16, "gn", "all"),
    ("imagenet100_s", "vit_tiny", "byol", 300, 128, 0.214, 0.326, 0.952, 0.0, 6, 8, "gn", "all"),
    ("imagenet100_s", "vit_tiny", "simsiam", 300, 128, 0.497, 0.067, 0.722, 0.0, 4, 16, "gn", "all"),
    ("stl10", "resnet18", "simclr", 400, 256, 0.132, 0.0195, 0.0, 0.0, 6, 128, "gn", "all"),
    ("stl10", "resnet18", "byol", 400, 128, 0.292, 0.093, 1.719, 0.0, 6, 64, "gn", "all"),
    ("stl10", "resnet18", "simsiam", 400, 128, 0.444, 0.038, 1.0, 0.0, 6, 32, "gn", "all"),
    ("stl10", "vit_tiny", "simclr", 200, 128, 0.103, 0.094, 0.391, 0.0, 4, 32, "gn", "all"),
    ("stl10", "vit_tiny", "byol", 200, 64, 0.444, 0.205, 0.827, 0.0, 6, 32, "gn", "all"),
    ("stl10", "vit_tiny", "simsiam", 200, 128, 0.292, 0.093, 0.858, 0.0, 6, 16, "gn", "all"),
    ("imagenet100", "resnet18", "simclr", 400, 128, 0.190, 0.499, 0.75, 0.0, 4, 8, "gn", "one"),
    ("imagenet100", "resnet18", "byol", 400, 128, 0.809, 0.130, 1.0, 0.0, 6, 32, "gn", "one"),
    ("imagenet100", "resnet18", "simsiam", 400, 128, 0.542, 0.485, 0.5, 0.0, 4, 32, "gn", "one"),
]
# Not published for ADIOS: starting points on CIFAR, from the STL10 ResNet18 settings.
CIFAR = [
    ("cifar10", "resnet18", "simclr", 400, 256, 0.3, 0.02, 0.5, 0.0, 4, 32, "gn", "all"),
    ("cifar10", "resnet18", "byol", 400, 256, 0.3, 0.09, 1.0, 0.0, 4, 32, "gn", "all"),
    ("cifar10", "resnet18", "simsiam", 400, 256, 0.4, 0.04, 1.0, 0.0, 4, 32, "gn", "all"),
    ("cifar100", "resnet18", "simclr", 400, 256, 0.3, 0.02, 0.5, 0.0, 4, 32, "gn", "all"),
    ("cifar100", "resnet18", "byol", 400, 256, 0.3, 0.09, 1.0, 0.0, 4, 32, "gn", "all"),
    ("cifar100", "resnet18", "simsiam", 400, 256, 0.4, 0.04, 1.0, 0.0, 4, 32, "gn", "all"),
]
DATA = {
    "imagenet100_s": ("adios_pl.data.ImageNet100DataModule", {"data_dir": "/path/to/imagenet", "image_size": 96}, 100),
    "imagenet100": ("adios_pl.data.ImageNet100DataModule", {"data_dir": "/path/to/imagenet", "image_size": 224}, 100),
    "stl10": ("adios_pl.data.STL10DataModule", {"data_dir": "data", "download": True}, 10),
    "cifar10": ("adios_pl.data.CIFAR10DataModule", {"data_dir": "data", "download": True}, 10),
    "cifar100": ("adios_pl.data.CIFAR100DataModule", {"data_dir": "data", "download": True}, 100),
}


def objective(method: str, data: str) -> dict[str, Any]:
    if method == "simclr":
        return {"class_path": "adios_pl.objectives.SimCLR", "init_args": {"temperature": 0.2, "proj_output_dim": 256 if data == "stl10" else 128}}
    if method == "byol":
        return {"class_path": "adios_pl.objectives.BYOL", "init_args": {"proj_output_dim": 256, "base_tau": 0.99}}
    return {"class_path": "adios_pl.objectives.SimSiam", "init_args": {"proj_output_dim": 256 if data == "stl10" else 2048}}


def config(row: tuple, variant: str) -> dict[str, Any]:
    data, encoder, method, epochs, batch, lr, mask_lr, a_s, a_e, n, width, norm, mode = row
    data_class, data_args, classes = DATA[data]
    model: dict[str, Any] = {
        "encoder": encoder, "objective": objective(method, data), "num_masks": n, "mask_mode": mode,
        "sparsity_weight": a_s, "entropy_weight": a_e, "mask_width": width, "mask_norm": norm,
        "optimizer": "lars", "lr": lr, "mask_lr": mask_lr, "weight_decay": 1e-5, "warmup_epochs": 10,
    }
    if variant == "baseline":
        model.update(num_masks=0)
    elif variant in ("random_patch", "random_block"):
        model.update(mask_type=variant, mask_mode="all")
    callbacks = [
        {"class_path": "adios_pl.callbacks.OnlineLinearProbe", "init_args": {"num_classes": classes}},
        {"class_path": "adios_pl.callbacks.OnlineKNN", "init_args": {"k": 200, "temperature": 0.07}},
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "every_n_epochs": 10}},
    ]
    if variant != "baseline":
        callbacks.insert(2, {"class_path": "adios_pl.callbacks.MaskVisualizer", "init_args": {"every_n_epochs": 10, "num_images": 8}})
    return {
        "seed_everything": 5,
        "trainer": {
            "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "sync_batchnorm": True,
            "max_epochs": epochs, "check_val_every_n_epoch": 10, "log_every_n_steps": 50, "callbacks": callbacks,
        },
        "model": model,
        "data": {"class_path": data_class, "init_args": {**data_args, "batch_size": batch, "num_workers": 8}},
    }


def main() -> None:
    root = Path("configs")
    rows = [(r, v) for r in PUBLISHED for v in ("adios_s" if r[-1] == "one" else "adios", "baseline")]
    rows += [(r, v) for r in PUBLISHED if r[0] == "stl10" and r[1] == "resnet18" for v in ("random_patch", "random_block")]
    rows += [(r, v) for r in CIFAR for v in ("adios", "baseline", "random_patch", "random_block") if r[2] == "simclr" or v in ("adios", "baseline")]
    for row, variant in rows:
        data, encoder, method = row[:3]
        path = root / data / f"{method}_{variant}_{encoder}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# Published ADIOS setting (shared ADIOS.md)" if row in PUBLISHED else "# Not a published ADIOS setting: a starting point for CIFAR"
        if variant == "baseline":
            header += "; baseline without masks (num_masks: 0)"
        elif variant.startswith("random"):
            header += f"; baseline with {variant.replace('_', ' ')} masks at the same masked fraction"
        path.write_text(header + "\n" + yaml.safe_dump(config(row, variant), sort_keys=False))
        print(path)


if __name__ == "__main__":
    main()
