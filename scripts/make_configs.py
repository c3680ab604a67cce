"""Write configs/ from the published settings of the 15 reference launch scripts.

The settings are ``configs/published_settings_long.csv`` (a copy of the shared table: one value
per script and setting, with its source and file:line in YugeTen/adios). Each setting the
library has a knob for is copied verbatim (:data:`KNOBS`); the others are listed in a comment at
the top of each config with what the library does instead. ``tests/test_configs.py`` regenerates
the files and fails when a committed config differs, and checks the values the CLI resolves.

Run from the repository root: ``python scripts/make_configs.py``.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "configs" / "published_settings_long.csv"


def _tuple(value: str) -> list[float]:
    return [float(v) for v in ast.literal_eval(value)]


def _bool(value: str) -> bool:
    return value.lower() == "true"


def _precision(value: str) -> str:
    return {"32": "32-true", "16": "16-mixed"}[value]


def _norm(value: str) -> str:
    return {"no": "none"}.get(value, value)


_OBJ = "model.objective.init_args."
_DATA = "data.init_args."
#: CSV column -> (config key, conversion). Every one is a knob of the library.
KNOBS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "backbone": ("model.encoder", str),
    "image_size": (_DATA + "image_size", int),  # linked to model.image_size by the CLI
    "max_epochs": ("trainer.max_epochs", int),
    "num_gpus": ("trainer.devices", int),
    "precision": ("trainer.precision", _precision),
    "accumulate_grad_batches": ("trainer.accumulate_grad_batches", int),
    "lars_eta": ("model.lars_eta", float),
    "lr": ("model.lr", float),
    "weight_decay": ("model.weight_decay", float),
    "warmup_epochs": ("model.warmup_epochs", float),
    "warmup_start_lr": ("model.warmup_start_lr", float),
    "min_lr": ("model.min_lr_factor", float),  # eta_min 0 is a factor 0 of every rate
    "mask_lr": ("model.mask_lr", float),
    "alpha_sparsity": ("model.sparsity_weight", float),
    "alpha_entropy": ("model.entropy_weight", float),
    "N_masks": ("model.num_masks", int),
    "unet_width_mask_fbase": ("model.mask_width", int),
    "unet_norm": ("model.mask_norm", _norm),
    "unet_num_blocks": ("model.mask_blocks", int),
    "proj_hidden_dim": (_OBJ + "proj_hidden_dim", int),
    "proj_output_dim": (_OBJ + "proj_output_dim", int),
    "pred_hidden_dim": (_OBJ + "pred_hidden_dim", int),
    "temperature": (_OBJ + "temperature", float),
    "base_tau_momentum": (_OBJ + "base_tau", float),
    "final_tau_momentum": (_OBJ + "final_tau", float),
    "use_symmetry_mask": (_OBJ + "use_symmetry_mask", _bool),
    "use_no_mask": (_OBJ + "use_no_mask", _bool),
    "use_both_mask": (_OBJ + "use_both_mask", _bool),
    "batch_size_per_gpu": (_DATA + "batch_size", int),
    "num_workers": (_DATA + "num_workers", int),
    "jitter_brightness": (_DATA + "brightness", float),
    "jitter_contrast": (_DATA + "contrast", float),
    "jitter_saturation": (_DATA + "saturation", float),
    "jitter_hue": (_DATA + "hue", float),
    "jitter_prob": (_DATA + "jitter_prob", float),
    "grayscale_prob": (_DATA + "grayscale_prob", float),
    "gaussian_blur_prob": (_DATA + "blur_prob", float),
    "solarization_prob": (_DATA + "solarization_prob", float),
    "hflip_prob": (_DATA + "flip_prob", float),
    "min_scale": (_DATA + "min_scale", float),
    "norm_mean": (_DATA + "mean", _tuple),
    "norm_std": (_DATA + "std", _tuple),
    "classifier_lr": ("trainer.callbacks[OnlineLinearProbe].lr", float),
}
#: Columns expressed by a choice rather than one value, and what they map to.
CHOICES = {
    "optimizer": "model.optimizer: 'lars' (SGD, momentum 0.9, wrapped in LARS: the columns optimizer + lars)",
    "lars": "model.optimizer: 'lars'",
    "scheduler": "model.schedule_interval: 'epoch' (pl_bolts' warm-up cosine stepped once per epoch)",
    "method": "model.objective (class) and model.mask_mode",
    "adios_variant": "model.mask_mode: 'all' (ADIOS) or 'one' (ADIOS-s)",
    "dataset": "the data class and its image_size",
}
#: Columns with no knob: what the library does instead (written into each config's header).
NO_KNOB = {
    "lars_clip": "LARS always clips the adaptive rate (as the reference)",
    "lars_exclude_bias_n_norm": "LARS always leaves 1-D parameters out (as the reference)",
    "mask_optimizer": "the mask generator always gets the encoder's optimiser type, lr=mask_lr, the same weight decay",
    "mask_cosine_horizon_epochs": "the mask schedule always spans the whole run (as the reference)",
    "train_mask_epoch": "no knob; see encoder_cosine_horizon_epochs",
    "encoder_cosine_horizon_epochs": "the encoder schedule spans the whole run; the reference's BYOL ends it 10 epochs early (README, Fidelity)",
    "crop": "RandomResizedCrop(image_size, scale=(min_scale, 1), bicubic), fixed",
    "n_views": "always two views",
    "train_data": "the DataModule's pretraining split",
    "auto_mask": "MaskVisualizer every epoch",
    "script": "",
    "other_flags_passed": "",  # paths and logging only
}
DATA = {
    "imagenet100": ("imagenet100", "adios_pl.data.ImageNet100DataModule", {"data_dir": "/path/to/imagenet", "image_size": 224}, 100),
    "imagenet100s": ("imagenet100_s", "adios_pl.data.ImageNet100DataModule", {"data_dir": "/path/to/imagenet", "image_size": 96}, 100),
    "stl10": ("stl10", "adios_pl.data.STL10DataModule", {"data_dir": "data", "download": True}, 10),
}
OBJECTIVES = {"simclr": "adios_pl.objectives.SimCLR", "byol": "adios_pl.objectives.BYOL", "simsiam": "adios_pl.objectives.SimSiam"}

# Not published for ADIOS: starting points on CIFAR (data, encoder, method, epochs, batch, lr,
# mask_lr, a_s, a_e, N, width, norm), from the STL10 ResNet18 settings.
CIFAR = [
    ("cifar10", "resnet18", "simclr", 400, 256, 0.3, 0.02, 0.5, 0.0, 4, 32, "gn"),
    ("cifar10", "resnet18", "byol", 400, 256, 0.3, 0.09, 1.0, 0.0, 4, 32, "gn"),
    ("cifar10", "resnet18", "simsiam", 400, 256, 0.4, 0.04, 1.0, 0.0, 4, 32, "gn"),
    ("cifar100", "resnet18", "simclr", 400, 256, 0.3, 0.02, 0.5, 0.0, 4, 32, "gn"),
    ("cifar100", "resnet18", "byol", 400, 256, 0.3, 0.09, 1.0, 0.0, 4, 32, "gn"),
    ("cifar100", "resnet18", "simsiam", 400, 256, 0.4, 0.04, 1.0, 0.0, 4, 32, "gn"),
]


def published(path: Path = CSV) -> dict[str, dict[str, str]]:
    """``{script: {column: value}}`` from the long CSV."""
    table: dict[str, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            table.setdefault(row["script"], {})[row["column"]] = row["value"]
    return table


def put(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; ``trainer.callbacks[Name].x`` sets a callback's argument."""
    *parents, last = key.split(".")
    node: Any = config
    for part in parents:
        if part.startswith("callbacks["):
            name = part[len("callbacks[") : -1]
            node = next(c["init_args"] for c in node["callbacks"] if c["class_path"].rsplit(".", 1)[-1] == name)
        else:
            node = node.setdefault(part, {})
    node[last] = value


def get(config: dict[str, Any], key: str) -> Any:
    """Read ``a.b.c`` (and ``trainer.callbacks[Name].x``) from nested dicts."""
    node: Any = config
    for part in key.split("."):
        if part.startswith("callbacks["):
            name = part[len("callbacks[") : -1]
            node = next(c["init_args"] for c in node["callbacks"] if c["class_path"].rsplit(".", 1)[-1] == name)
        else:
            node = node[part]
    return node


def _callbacks(classes: int, masks: bool) -> list[dict[str, Any]]:
    callbacks = [
        {"class_path": "adios_pl.callbacks.OnlineLinearProbe", "init_args": {"num_classes": classes}},
        {"class_path": "adios_pl.callbacks.OnlineKNN", "init_args": {"k": 200, "temperature": 0.07}},
        # by its class name, which LightningCLI finds in whichever Lightning package adios-pl uses
        {"class_path": "ModelCheckpoint", "init_args": {"save_last": True, "every_n_epochs": 10}},
    ]
    if masks:
        callbacks.insert(2, {"class_path": "adios_pl.callbacks.MaskVisualizer", "init_args": {"every_n_epochs": 1, "num_images": 8}})
    return callbacks


def from_script(settings: dict[str, str], variant: str) -> dict[str, Any]:
    """The config of one launch script (``variant``: the script's own, or a baseline)."""
    method, _, kind = settings["method"].partition("_")
    _, data_class, data_args, classes = DATA[settings["dataset"]]
    config: dict[str, Any] = {
        "seed_everything": 5,
        "trainer": {"accelerator": "gpu", "check_val_every_n_epoch": 1, "log_every_n_steps": 50,
                    "callbacks": _callbacks(classes, variant != "baseline")},
        "model": {"objective": {"class_path": OBJECTIVES[method], "init_args": {}},
                  "mask_mode": "one" if kind == "adios_s" else "all", "optimizer": "lars", "schedule_interval": "epoch"},
        "data": {"class_path": data_class, "init_args": dict(data_args)},
    }
    assert settings["optimizer"] == "sgd" and settings["lars"] == "True" and settings["scheduler"] == "warmup_cosine"
    for column, (key, convert) in KNOBS.items():
        value = settings[column]
        if value in ("n/a", ""):
            continue
        put(config, key, convert(value))
    if method == "simsiam":  # the reference's SimSiam: both views masked, constant predictor rate
        config["model"]["objective"]["init_args"].update(mask_both_views=True, constant_predictor_lr=True)
    if variant == "baseline":
        config["model"]["num_masks"] = 0
    elif variant.startswith("random"):
        config["model"].update(mask_type=variant, mask_mode="all")
    return config


def _cifar(row: tuple, variant: str) -> dict[str, Any]:
    data, encoder, method, epochs, batch, lr, mask_lr, a_s, a_e, n, width, norm = row
    cls = "CIFAR10DataModule" if data == "cifar10" else "CIFAR100DataModule"
    objective: dict[str, Any] = {"simclr": {"temperature": 0.2}, "byol": {}, "simsiam": {}}[method]
    model: dict[str, Any] = {
        "encoder": encoder, "objective": {"class_path": OBJECTIVES[method], "init_args": objective}, "num_masks": n,
        "mask_mode": "all", "sparsity_weight": a_s, "entropy_weight": a_e, "mask_width": width, "mask_norm": norm,
        "optimizer": "lars", "lr": lr, "mask_lr": mask_lr, "weight_decay": 1e-5, "warmup_epochs": 10,
    }
    if variant == "baseline":
        model["num_masks"] = 0
    elif variant.startswith("random"):
        model["mask_type"] = variant
    return {
        "seed_everything": 5,
        "trainer": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "max_epochs": epochs,
                    "check_val_every_n_epoch": 10, "log_every_n_steps": 50,
                    "callbacks": _callbacks(10 if data == "cifar10" else 100, variant != "baseline")},
        "model": model,
        "data": {"class_path": f"adios_pl.data.{cls}", "init_args": {"data_dir": "data", "download": True, "batch_size": batch, "num_workers": 8}},
    }


def header(script: str, settings: dict[str, str], variant: str) -> str:
    lines = [f"# Published ADIOS setting: YugeTen/adios {script} (configs/published_settings_long.csv)."]
    if variant == "baseline":
        lines.append("# Baseline: the same settings without masks (num_masks: 0).")
    elif variant.startswith("random"):
        lines.append(f"# Baseline: {variant.replace('_', ' ')} masks at the same masked fraction instead of learned ones.")
    lines.append("# Settings without a knob here (reference value: what adios-pl does):")
    for column, note in NO_KNOB.items():
        if note and settings.get(column, "n/a") not in ("n/a", ""):
            lines.append(f"#   {column} = {settings[column]}: {note}")
    lines.append("# Generated by scripts/make_configs.py; edit the script, not this file.")
    return "\n".join(lines) + "\n"


def all_configs() -> dict[Path, str]:
    """``{path: text}`` of every config."""
    out: dict[Path, str] = {}
    for script, settings in published().items():
        method, _, kind = settings["method"].partition("_")
        folder = DATA[settings["dataset"]][0]
        encoder = settings["backbone"]
        variants = [kind, "baseline"]
        if folder == "stl10" and encoder == "resnet18":
            variants += ["random_patch", "random_block"]
        for variant in variants:
            path = Path("configs") / folder / f"{method}_{variant}_{encoder}.yaml"
            out[path] = header(script, settings, variant) + yaml.safe_dump(from_script(settings, variant), sort_keys=False)
    for row in CIFAR:
        for variant in ("adios", "baseline", "random_patch", "random_block"):
            if variant.startswith("random") and row[2] != "simclr":
                continue
            path = Path("configs") / row[0] / f"{row[2]}_{variant}_{row[1]}.yaml"
            text = "# Not a published ADIOS setting: a starting point for CIFAR"
            text += "; baseline without masks (num_masks: 0)\n" if variant == "baseline" else "\n"
            out[path] = text + yaml.safe_dump(_cifar(row, variant), sort_keys=False)
    return out


def main() -> None:
    for path, text in all_configs().items():
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(text)
        print(path)


if __name__ == "__main__":
    main()
