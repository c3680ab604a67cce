"""Checkpoints: the user's configuration wins, nothing in a checkpoint names code, files fail clearly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import CPU, ROOT, stubbed_data  # noqa: F401  (fixture)

from adios_pl import ADIOSModule
from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.cli import main
from adios_pl.encoders import SmallConvNet
from adios_pl.errors import ConfigurationError
from adios_pl.masks import MaskGenerator
from adios_pl.objectives import SimCLR

from conftest import make_loader, quiet_trainer

CONFIG = str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml")


def _checkpoint(tmp_path: Path, **kw: Any) -> Path:
    args: dict[str, Any] = dict(encoder="resnet18", objective=SimCLR(temperature=0.2), num_masks=4, mask_width=32, image_size=32,
                                optimizer="lars", lr=0.3, mask_lr=0.02, sparsity_weight=0.5, warmup_epochs=0)
    args.update(kw)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(ADIOSModule(**args), make_loader(n=4, batch_size=4, size=32))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_command_line_settings_win_over_the_checkpoint(stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _checkpoint(tmp_path, num_masks=2)
    code = main(["fit", "--config", CONFIG, *CPU, "--model.num_masks=4", "--trainer.max_steps=2", f"--ckpt_path={ckpt}"])
    err = capsys.readouterr().err
    assert code == 2 and "num_masks: checkpoint 2, this model 4" in err, err


def test_a_changed_lr_takes_effect_on_resume(stubbed_data: None, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.3]
    seen: dict[str, float] = {}

    class Record(__import__("pytorch_lightning").Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            seen["base"] = trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]

    module = ADIOSModule(encoder="resnet18", objective=SimCLR(temperature=0.2), num_masks=4, mask_width=32, image_size=32,
                         optimizer="lars", lr=0.003, mask_lr=0.02, sparsity_weight=0.5, warmup_epochs=0)
    quiet_trainer(max_steps=2, callbacks=[Record()]).fit(module, make_loader(n=8, batch_size=4, size=32), ckpt_path=str(ckpt))
    assert seen["base"] == 0.003 and seen["lr"] == pytest.approx(0.003 * saved["optimizer_states"][0]["param_groups"][0]["lr"] / 0.3)


def test_a_class_path_in_checkpoint_hyper_parameters_is_never_imported(stubbed_data: None, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil:\n    pass\n")
    state["hyper_parameters"]["objective"] = {"class_path": "evil_module.Evil"}
    state["hyper_parameters"]["lr"] = 99.0
    torch.save(state, ckpt)
    sys.path.insert(0, str(tmp_path))
    try:
        main(["fit", "--config", CONFIG, *CPU, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"])
        assert not marker.exists(), "resuming imported a class named in the checkpoint"
        with pytest.raises(ConfigurationError, match=r"names the class 'evil_module.Evil', whose module 'evil_module' is not imported"):
            ADIOSModule.load_from_checkpoint(ckpt)
        assert not marker.exists(), "load_from_checkpoint imported a class named in the checkpoint"
    finally:
        sys.path.remove(str(tmp_path))


def _same_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    state = model.state_dict()
    assert sorted(state) == sorted(saved)
    different = [name for name in saved if not torch.equal(state[name], saved[name])]
    assert not different, f"not loaded: {different}"


USERS_ENCODER = """
import torch
from torch import nn


class TinyEncoder(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.num_features = channels
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
"""


def test_a_command_line_checkpoint_loads_as_trained(stubbed_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``adios-pl fit`` keeps the objective, its arguments, a class-path mask generator and a
    user's encoder class in the checkpoint's hyper-parameters, so ``load_from_checkpoint(path)``
    alone rebuilds them."""
    (tmp_path / "users_encoder.py").write_text(USERS_ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    masks = '{"class_path": "adios_pl.masks.RandomMasks", "init_args": {"num_masks": 4, "image_size": 32, "kind": "random_block"}}'
    code = main(["fit", "--config", str(ROOT / "configs/cifar10/byol_adios_resnet18.yaml"), *CPU, "--trainer.max_steps=1",
                 "--model.encoder=users_encoder.TinyEncoder", "--model.encoder.channels=24", "--model.objective.init_args.proj_hidden_dim=48",
                 "--model.objective.init_args.pred_hidden_dim=24", "--model.objective.init_args.base_tau=0.9",
                 f"--model.mask_generator={masks}", f"--trainer.default_root_dir={tmp_path}"])
    assert code == 0
    (ckpt,) = tmp_path.rglob("*.ckpt")
    model = ADIOSModule.load_from_checkpoint(ckpt)
    objective: Any = model.objective
    assert type(objective).__name__ == "BYOL" and (objective.proj_hidden_dim, objective.pred_hidden_dim, objective.base_tau) == (48, 24, 0.9)
    assert type(model.mask_generator).__name__ == "RandomMasks" and model.mask_generator.kind == "random_block"
    assert type(model.encoder).__name__ == "TinyEncoder" and model.encoder.num_features == 24
    _same_weights(model, ckpt)
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    for name in ("encoder", "objective", "mask_generator"):  # so the loaded model's own checkpoints load alone too
        assert model.hparams[name] == saved[name], name


class HalfTemperature(SimCLR):
    """A user's objective whose argument is not kept under its own name: it cannot be read back."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(temperature=0.5 * scale)


def test_a_script_checkpoint_rebuilds_the_librarys_parts_and_asks_for_others(tmp_path: Path) -> None:
    """The library's objectives, mask generators and small encoder passed in a script are saved
    with their arguments and rebuilt alone; a user's part that cannot be read back is named,
    not replaced by the default (SimCLR at another temperature would load the same weights)."""
    parts = dict(encoder=SmallConvNet(width=8), objective=SimCLR(temperature=0.2, proj_hidden_dim=64),
                 mask_generator=MaskGenerator(4, 32, width=16, norm="in"))
    ckpt = _checkpoint(tmp_path, **parts)
    model = ADIOSModule.load_from_checkpoint(ckpt)
    assert (model.objective.temperature, model.objective.proj_hidden_dim) == (0.2, 64)  # type: ignore[union-attr]
    assert (model.encoder.width, model.mask_generator.width, model.mask_generator.norm) == (8, 16, "in")  # type: ignore[union-attr]
    _same_weights(model, ckpt)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        model.load_from_checkpoint(ckpt)

    users = _checkpoint(tmp_path, encoder="small_cnn", objective=HalfTemperature(scale=0.4))
    with pytest.raises(ConfigurationError, match=r"holds the weights of objective but not the arguments to build it.*load_from_checkpoint\(path, objective=\.\.\."):
        ADIOSModule.load_from_checkpoint(users)
    model = ADIOSModule.load_from_checkpoint(users, objective=HalfTemperature(scale=0.4))
    assert model.objective.temperature == 0.2  # type: ignore[union-attr]
    _same_weights(model, users)
    default = _checkpoint(tmp_path, encoder="small_cnn", objective=None)
    _same_weights(ADIOSModule.load_from_checkpoint(default), default)


def test_another_optimizer_is_a_clear_error(stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _checkpoint(tmp_path, optimizer="adamw")
    assert main(["fit", "--config", CONFIG, *CPU, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"]) == 2
    assert "optimizer: checkpoint 'adamw', this model 'lars'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_empty_or_truncated_checkpoint_is_one_line(content: bytes, stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    assert main(["fit", "--config", CONFIG, *CPU, "--trainer.max_steps=1", f"--ckpt_path={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable checkpoint" in err[0] and f"{len(content)} bytes" in err[0], err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", None], ids=["empty", "truncated", "folder"])
def test_loading_an_unreadable_checkpoint_is_one_line(content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``load_from_checkpoint`` and ``adios-pl evaluate`` name the file and what is wrong with it."""
    bad = tmp_path / "bad.ckpt"
    bad.mkdir() if content is None else bad.write_bytes(content)
    expected = "is a folder; pass a checkpoint file" if content is None else f"is not a readable checkpoint \\({len(content)} bytes"
    with pytest.raises(ConfigurationError, match=expected):
        ADIOSModule.load_from_checkpoint(bad)
    capsys.readouterr()
    assert main(["evaluate", "--ckpt_path", str(bad), "--data=CIFAR10DataModule"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err


def test_a_checkpoint_is_loaded_as_data_unless_asked_otherwise(tmp_path: Path) -> None:
    """An object outside torch's weights-only allow-list (here a ``datetime.date``; in an attack,
    anything pickle can call) is refused by default and loads only when asked for."""
    import datetime

    path = tmp_path / "carries_an_object.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "made": datetime.date(2022, 7, 17)}, path)
    with pytest.raises(ConfigurationError, match=r"beyond tensors and plain containers \(the first: datetime.date\).*weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["made"] == datetime.date(2022, 7, 17)


def test_temporaries_of_killed_saves_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".last.ckpt.tmp{dead}"
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".last.ckpt.tmp{os.getppid()}"  # a running process: maybe saving right now
    alive.write_bytes(b"y")
    AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(2)}, tmp_path / "last.ckpt")
    assert not stale.exists() and alive.exists()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["a"], torch.zeros(2))


def test_a_failed_write_names_the_path_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "last.ckpt")

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*last\.ckpt .*MiB free"):
        io.save_checkpoint({"a": torch.zeros(1)}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_export_refuses_to_overwrite_the_checkpoint(tmp_path: Path) -> None:
    from adios_pl.export import export_encoder

    ckpt = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export_encoder(ckpt, ckpt)


def test_the_command_line_installs_atomic_checkpoint_io(stubbed_data: None) -> None:
    from adios_pl.cli import build_cli

    cli = build_cli(["--config", CONFIG, *CPU], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    import pytorch_lightning as pl

    plain = pl.Trainer(accelerator="cpu", logger=False)
    assert not isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO), "a plain Trainer is left as Lightning makes it"


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_configured_rates_replace_the_saved_ones_for_both_players(optimizer: str) -> None:
    """:func:`apply_configured_rates` on a checkpoint written out by hand: each player's current
    rate rescaled by configured / saved base rate (the encoder's by ``lr``, the mask generator's
    by ``mask_lr``), the base rates, weight decay and (not for AdamW) momentum replaced."""
    from adios_pl.resume import apply_configured_rates

    def group(lr: float) -> dict[str, Any]:
        return {"lr": lr, "initial_lr": lr * 2, "weight_decay": 1e-4, "momentum": 0.9}

    checkpoint: dict[str, Any] = {
        "optimizer_states": [{"param_groups": [group(0.15), group(0.15)]}, {"param_groups": [group(0.01)]}],
        "lr_schedulers": [{"base_lrs": [0.3, 0.3], "_last_lr": [0.15, 0.15]}, {"base_lrs": [0.02], "_last_lr": [0.01]}],
    }
    apply_configured_rates(checkpoint, lr=0.6, mask_lr=0.01, weight_decay=5e-4, momentum=0.8, optimizer=optimizer)
    encoder, masks = (state["param_groups"] for state in checkpoint["optimizer_states"])
    assert [g["lr"] for g in encoder] == pytest.approx([0.3, 0.3]) and masks[0]["lr"] == pytest.approx(0.005)
    assert [g["initial_lr"] for g in encoder + masks] == [0.6, 0.6, 0.01]
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [0.6, 0.6] and checkpoint["lr_schedulers"][1]["base_lrs"] == [0.01]
    assert checkpoint["lr_schedulers"][1]["_last_lr"] == pytest.approx([0.005])
    assert all(g["weight_decay"] == 5e-4 for g in encoder + masks)
    assert all(g["momentum"] == (0.9 if optimizer == "adamw" else 0.8) for g in encoder + masks)


def test_load_from_checkpoint_reads_file_objects_and_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks read the hyper-parameters from wherever Lightning reads the checkpoint: an open
    file (rewound for Lightning after) or a URL (through torch.hub, which keeps the download)."""
    ckpt = _checkpoint(tmp_path, encoder="small_cnn", objective=None)
    with open(ckpt, "rb") as f:
        _same_weights(ADIOSModule.load_from_checkpoint(f), ckpt)
    urls: list[str] = []

    def from_url(url: str, map_location: Any = None, weights_only: bool = False, **kwargs: Any) -> Any:
        urls.append(url)
        return torch.load(ckpt, map_location=map_location, weights_only=weights_only)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", from_url)
    _same_weights(ADIOSModule.load_from_checkpoint("https://example.org/run.ckpt"), ckpt)
    assert urls == ["https://example.org/run.ckpt"] * 2


@pytest.mark.parametrize("suffix", ["yaml", "csv"])
def test_an_hparams_file_is_checked_as_the_checkpoint_would_be(suffix: str, tmp_path: Path) -> None:
    """Lightning builds from ``hparams_file`` instead of the checkpoint's own; the checks read it."""
    from pytorch_lightning.core.saving import save_hparams_to_tags_csv, save_hparams_to_yaml

    ckpt = _checkpoint(tmp_path, encoder="small_cnn", objective=None)
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    save = save_hparams_to_tags_csv if suffix == "csv" else save_hparams_to_yaml
    save(tmp_path / f"hparams.{suffix}", {key: value for key, value in hparams.items() if key != "objective"})
    with pytest.raises(ConfigurationError, match="holds the weights of objective"):
        ADIOSModule.load_from_checkpoint(ckpt, hparams_file=tmp_path / f"hparams.{suffix}")
