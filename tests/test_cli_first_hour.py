"""A user's first hour with the command line: what it refuses, what it explains, what it writes."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import runpy
import shlex
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
import yaml
from PIL import Image
from test_checkpoints import HalfTemperature, _checkpoint
from test_cli import CPU, ROOT, stubbed_data  # noqa: F401  (fixture)

import adios_pl.cli
from adios_pl import ADIOSModule
from adios_pl.callbacks import MaskVisualizer
from adios_pl.cli import main
from adios_pl.data import CIFAR10DataModule, ImageFolderDataModule, ShapesDataModule
from adios_pl.evaluation import evaluate_encoder

from conftest import make_loader, quiet_trainer

CONFIG = str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml")


def _exit_code(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.mark.parametrize("flag", [["--optimizer", "torch.optim.AdamW"], ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"]])
def test_generic_optimizer_flags_are_not_offered(flag: list[str], capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(["fit", "--config", CONFIG, *flag]) != 0
    assert "--optimizer" not in capsys.readouterr().out


def test_test_subcommand_is_gone_and_help_names_the_subcommands(capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(["test", "--config", CONFIG]) != 0
    capsys.readouterr()
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "predict" in out and "evaluate" in out and "export" in out and "Lightning Trainer command line tool" not in out
    assert main(["--version"]) == 0 and "adios-pl 0." in capsys.readouterr().out


def test_fit_help_lists_the_librarys_modules_not_every_module(capsys: pytest.CaptureFixture) -> None:
    """jsonargparse lists every importable ``nn.Module`` subclass for ``--model.encoder`` and
    ``--model.mask_generator`` (about 1,600 each: ``fit --help`` ran to 3,524 lines); the help keeps
    the library's classes of each kind and counts the others. Short lists stay whole."""
    assert _exit_code(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 1000, len(out.splitlines())
    flat = " ".join(out.split())  # the help is wrapped to the terminal's width; an option's last mention is its entry
    for flag, kept in (("--model.encoder ENCODER", ["adios_pl.encoders.SmallConvNet"]),
                       ("--model.mask_generator MASK_GENERATOR", ["adios_pl.masks.MaskGenerator", "adios_pl.masks.RandomMasks"])):
        listed = flat.rsplit(flag, 1)[1].split("known subclasses: ", 1)[1].split(")", 1)[0].split(", ")
        assert listed[:-1] == kept and re.fullmatch(r"and \d{3,} others: any importable class path", listed[-1]), listed
    objectives = flat.rsplit("--model.objective OBJECTIVE", 1)[1].split("known subclasses: ", 1)[1].split(")", 1)[0]
    library = {f"adios_pl.objectives.{name}" for name in ("Objective", "BYOL", "SimCLR", "SimSiam")}
    assert library <= set(objectives.split(", ")) and "others" not in objectives, objectives  # (with the tests' own subclasses)


def test_a_long_subclass_list_is_cut_to_the_kept_prefix() -> None:
    from adios_pl.cli import shorten_subclass_list

    many = ", ".join([f"torch.nn.M{i}" for i in range(50)] + ["adios_pl.masks.A", "adios_pl.encoders.B"])
    text = f"Any module. (type: Module, default: null, known subclasses: {many})"
    assert shorten_subclass_list(text, "adios_pl.masks.") == "Any module. (type: Module, default: null, known subclasses: adios_pl.masks.A, and 51 others: any importable class path)"
    assert shorten_subclass_list(text) == "Any module. (type: Module, default: null, known subclasses: adios_pl.masks.A, adios_pl.encoders.B, and 50 others: any importable class path)"
    short = "An objective. (type: Objective, known subclasses: adios_pl.objectives.SimCLR, adios_pl.objectives.BYOL)"
    assert shorten_subclass_list(short) == short and shorten_subclass_list("A number. (type: int)") == "A number. (type: int)"


def test_a_whole_number_of_batches_is_a_count_not_the_whole_epoch(tmp_path: Path) -> None:
    """``--trainer.limit_train_batches=1`` (or ``1`` in a config) is one batch; ``1.0`` is all of
    them. The Trainer's hint came out as ``Union[float, int, None]``, so it was read as 1.0."""
    from adios_pl.cli import build_cli

    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_test_batches: 2\n  limit_predict_batches: 1.0\n")
    cli = build_cli(["--config", CONFIG, *CPU, "--config", str(config), "--trainer.limit_train_batches=1",
                     "--trainer.limit_val_batches=0.5"], run=False)
    limits = {name: getattr(cli.trainer, f"limit_{name}_batches") for name in ("train", "val", "test", "predict")}
    assert limits == {"train": 1, "val": 0.5, "test": 2, "predict": 1.0}, limits
    assert [type(v) for v in limits.values()] == [int, float, int, float], limits


def test_whole_numbers_as_int_puts_int_before_float() -> None:
    from typing import Union

    from jsonargparse import ArgumentParser

    from adios_pl.cli import whole_numbers_as_int

    parser = ArgumentParser()
    parser.add_argument("--limit", type=Union[(float, int, type(None))])  # as the Trainer's hint can come out
    parser.add_argument("--scale", type=float)
    assert repr(parser.parse_args(["--limit=1"]).limit) == "1.0"
    assert whole_numbers_as_int(parser) == ["limit"]
    assert [repr(parser.parse_args([f"--limit={v}"]).limit) for v in ("1", "1.0", "0.5", "7", "null")] == ["1", "1.0", "0.5", "7", "None"]
    assert repr(parser.parse_args(["--scale=1"]).scale) == "1.0"


@pytest.mark.parametrize("flag", ["--trainer.max_step=3", "--model.num_mask=2"])
def test_abbreviated_flags_are_refused(flag: str, capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(["fit", "--config", CONFIG, flag]) != 0
    assert "did you mean" in capsys.readouterr().err


def test_abbreviated_demo_flags_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """As in every other subcommand: --minute is not taken for --minutes."""
    assert _exit_code(["demo", "--minute=0.01", "--tiny", f"--out={tmp_path}"]) == 2
    assert "unrecognized arguments: --minute=0.01" in capsys.readouterr().err


def test_misspelt_or_bad_data_key_names_the_cause(capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(["fit", "--config", CONFIG, "--data.init_args.batch_sise=3"]) != 0
    assert "did you mean 'data.init_args.batch_size'" in capsys.readouterr().err
    assert _exit_code(["fit", "--config", CONFIG, "--data.init_args.min_scale=2", *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adios-pl: error: min_scale must be in (0, 1], got 2.0"], err


def test_predict_writes_features(stubbed_data: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``predict`` writes both evaluation loaders' features, and says where."""
    with caplog.at_level(logging.INFO):
        assert main(["predict", "--config", CONFIG, *CPU, f"--trainer.default_root_dir={tmp_path}"]) == 0
    files = sorted((tmp_path / "features").glob("features_*_rank0.pt"))
    assert [f.name for f in files] == ["features_0_rank0.pt", "features_1_rank0.pt"]
    for loader, path in enumerate(files):
        assert f"FeatureWriter: the features of 4 images of loader {loader} -> {path}" in caplog.text, caplog.text
    data = torch.load(files[0], weights_only=True)
    assert data["features"].shape == (4, 512) and data["targets"].shape == (4,) and data["indices"].tolist() == [0, 1, 2, 3]
    model = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=16, num_masks=2, mask_width=8)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model.embed(x))


def test_ckpt_path_last_resumes_the_newest_run(stubbed_data: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A job restarted with ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the logger's
    earlier versions (Lightning's own "last" looks in the new, empty version folder and trains
    from scratch); ``validate`` without one stops instead of scoring untrained weights."""
    loaded: list[tuple[str, Any]] = []
    for name in ("fit", "validate"):
        original = getattr(pl.Trainer, name)

        @functools.wraps(original)  # the CLI reads the subcommand's arguments from the signature
        def recording(self: pl.Trainer, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            loaded.append((_name, kwargs.get("ckpt_path")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pl.Trainer, name, recording)
    logged = [a for a in CPU if not a.startswith("--trainer.logger")]  # Lightning's default logger: version_N folders
    run = [*logged, "--model.encoder=small_cnn", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last"]
    capsys.readouterr()
    assert _exit_code(["validate", "--config", CONFIG, *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ckpt_path last: no checkpoint matches {tmp_path / 'lightning_logs' / '*' / 'checkpoints' / 'last*.ckpt'}, " in err[0], err
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", CONFIG, *run, "--trainer.max_epochs=1"]) == 0
    assert "no checkpoint matches" in caplog.text and "training from the start" in caplog.text
    assert not [w for w in caught if "saves last.ckpt" in str(w.message)]  # the config's ModelCheckpoint does
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["fit", "--config", CONFIG, *run, "--trainer.max_epochs=2"]) == 0
    second = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", CONFIG, *run]) == 0
    assert loaded == [("fit", None), ("fit", str(first)), ("validate", str(second))], loaded
    steps = [torch.load(path, weights_only=True)["global_step"] for path in (first, second)]
    assert steps[1] == 2 * steps[0] > 0, steps  # the second run trained its one epoch on top of the first
    # a run whose checkpoints include no last.ckpt (Lightning's default ModelCheckpoint) is told
    elsewhere = [a.replace(str(tmp_path), str(tmp_path / "no_last")) for a in run]
    with pytest.warns(UserWarning, match="no ModelCheckpoint of this run saves last.ckpt"):
        assert main(["fit", "--config", CONFIG, *elsewhere, "--trainer.max_steps=1", "--trainer.callbacks=[]"]) == 0


def test_find_last_checkpoint_follows_lightnings_folders(tmp_path: Path) -> None:
    """The folders ModelCheckpoint writes into: its dirpath; else every version of the first
    logger's folder; else ``<default_root_dir>/checkpoints``; and SLURM's requeue checkpoint. The
    newest ``last*.ckpt`` or ``hpc_ckpt_*.ckpt`` wins; temporaries and other checkpoints are not
    candidates."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from adios_pl.resume import find_last_checkpoint

    def write(relative: str, mtime: float) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
        return path

    def trainer(**kwargs: Any) -> pl.Trainer:
        return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False, **kwargs)

    assert find_last_checkpoint(trainer(logger=CSVLogger(tmp_path / "logs", name="exp"))) is None
    write("logs/exp/version_0/checkpoints/last.ckpt", 1000)
    newest = write("logs/exp/version_1/checkpoints/last-v1.ckpt", 3000)
    write("logs/exp/version_1/checkpoints/last.ckpt", 2000)
    write("logs/exp/version_2/checkpoints/.last.ckpt.tmp123", 9000)  # a save that was killed
    write("logs/exp/version_2/checkpoints/epoch=3-step=8.ckpt", 9000)
    write("logs/other/version_0/checkpoints/last.ckpt", 9000)  # another logger name: another experiment
    assert find_last_checkpoint(trainer(logger=CSVLogger(tmp_path / "logs", name="exp"))) == str(newest)
    write("logs/exp/version_9/checkpoints/last.ckpt", 3000)  # the same second as version_1's newest
    tenth = write("logs/exp/version_10/checkpoints/last.ckpt", 3000)
    assert find_last_checkpoint(trainer(logger=CSVLogger(tmp_path / "logs", name="exp"))) == str(tenth)
    without_logger = write("checkpoints/last.ckpt", 500)
    assert find_last_checkpoint(trainer(logger=False)) == str(without_logger)
    chosen = write("elsewhere/last.ckpt", 100)
    assert find_last_checkpoint(trainer(logger=False, callbacks=[ModelCheckpoint(dirpath=tmp_path / "elsewhere")])) == str(chosen)
    assert find_last_checkpoint(trainer(logger=False, enable_checkpointing=False)) is None
    requeued = write("hpc_ckpt_2.ckpt", 4000)  # Lightning's SLURM requeue, at the signal
    write("hpc_ckpt_1.ckpt", 1500)
    assert find_last_checkpoint(trainer(logger=CSVLogger(tmp_path / "logs", name="exp"))) == str(requeued)
    assert find_last_checkpoint(trainer(logger=False, enable_checkpointing=False)) == str(requeued)


def test_failed_download_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", CONFIG, *CPU, "--data.init_args.data_dir=data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download CIFAR10" in err[0] and "cifar-10-batches-py" in err[0], err
    assert not (tmp_path / "data").exists(), "the failed download left an empty data folder"


def test_a_bug_while_training_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, stubbed_data: None) -> None:
    def broken(self: ADIOSModule, batch: object, batch_idx: int) -> None:
        raise KeyError("a programming error")

    monkeypatch.setattr(ADIOSModule, "training_step", broken)
    with pytest.raises(KeyError, match="a programming error"):
        main(["fit", "--config", CONFIG, *CPU, "--trainer.fast_dev_run=1"])


def test_warmup_longer_than_the_run_warns() -> None:
    model = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=16, num_masks=2, mask_width=8, warmup_epochs=10)
    with pytest.warns(UserWarning, match="warmup_epochs=10"):
        quiet_trainer(max_steps=2).fit(model, make_loader(n=16, size=16))


def test_pin_memory_follows_the_accelerator() -> None:
    data = ShapesDataModule(train_size=32, val_size=8, batch_size=8, num_workers=0)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(
        ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=32, num_masks=2, mask_width=8, warmup_epochs=0), data)
    assert data.train_dataloader().pin_memory is False
    assert ShapesDataModule(pin_memory=True)._pin() is True


def test_mask_pictures_are_named_by_step_and_spread_over_the_split(tmp_path: Path) -> None:
    data = ShapesDataModule(train_size=64, val_size=40, batch_size=16, num_workers=0)
    viz = MaskVisualizer(num_images=4, out_dir=str(tmp_path))
    model = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=32, num_masks=2, mask_width=8, warmup_epochs=0)
    quiet_trainer(max_epochs=1, val_check_interval=2, callbacks=[viz], num_sanity_val_steps=0).fit(model, data)
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pictures) == 2 and pictures[0] != pictures[1], pictures  # two validations in one epoch
    loaders = data.val_dataloader()
    chosen = viz._images(type("T", (), {"val_dataloaders": loaders})())  # type: ignore[arg-type]
    dataset = loaders[0].dataset
    expected = torch.stack([dataset[i][0] for i in (0, 13, 26, 39)])
    assert chosen is not None and torch.equal(chosen, expected)
    # validate restores no epoch or step: its picture is named by the checkpoint, and shows the
    # masks of the weights that drew the last picture of fit
    trainer = quiet_trainer(max_epochs=1, val_check_interval=2, callbacks=[viz], num_sanity_val_steps=0)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    last_of_fit = viz.last_path
    fresh = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=32, num_masks=2, mask_width=8, warmup_epochs=0)
    quiet_trainer(callbacks=[viz]).validate(fresh, data, ckpt_path=tmp_path / "trained.ckpt")
    assert viz.last_path == tmp_path / "validate_trained.png"
    assert last_of_fit is not None and viz.last_path.read_bytes() == last_of_fit.read_bytes()
    quiet_trainer(callbacks=[viz]).validate(fresh, data)
    assert viz.last_path == tmp_path / "validate_model.png"


def test_plain_torchvision_resnet_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"fc = nn.Identity\(\)`.*num_features = 512"):
        ADIOSModule(encoder=torchvision.models.resnet18(), image_size=32, num_masks=2)


def test_example_loads_an_exported_resnet(tmp_path: Path) -> None:
    model = ADIOSModule(encoder="resnet18", image_size=32, num_masks=2, mask_width=8)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "resnet.ckpt")
    small = ADIOSModule(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=32, num_masks=2, mask_width=8)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.ckpt")
    script = str(ROOT / "examples" / "load_exported_encoder.py")
    ok = subprocess.run([sys.executable, script, str(tmp_path / "resnet.ckpt"), "--out", str(tmp_path / "enc.pt")],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and "(2, 10)" in ok.stdout, ok.stderr
    refused = subprocess.run([sys.executable, script, str(tmp_path / "small.ckpt")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode != 0 and "does not hold a ResNet encoder" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pt", "resnet.ckpt", "small.ckpt"]


def test_example_evaluates_a_command_line_checkpoint(stubbed_data: None, tmp_path: Path) -> None:
    assert main(["fit", "--config", CONFIG, *CPU, "--model.encoder=small_cnn", "--trainer.max_steps=1",
                 f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 0
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    script = str(ROOT / "examples" / "evaluate_checkpoint.py")
    done = subprocess.run([sys.executable, script, str(ckpt), "--train-dir", str(tmp_path / "images"), "--epochs", "2",
                           "--batch-size", "4", "--num-workers", "0", "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # the same sums as this process
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    data = ImageFolderDataModule(str(tmp_path / "images"), image_size=32, batch_size=4, num_workers=0)
    expected = evaluate_encoder(ADIOSModule.load_from_checkpoint(ckpt).encoder, data, device="cpu", epochs=2)
    assert {key: result[key] for key in expected} == expected, (result, expected)


def test_evaluate_scores_a_run_with_its_own_config(stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``adios-pl evaluate -c <the run's config> --ckpt_path ...`` prints what ``evaluate_encoder``
    gives for the checkpoint's encoder on the run's DataModule, at the checkpoint's image size."""
    sizes: list[int] = []
    encoders: list[torch.nn.Module] = []
    settings: list[dict[str, object]] = []

    def recording(encoder: torch.nn.Module, datamodule: CIFAR10DataModule, **kw: object) -> dict[str, float]:
        sizes.append(datamodule.image_size)
        encoders.append(encoder)
        settings.append(kw)
        return evaluate_encoder(encoder, datamodule, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(adios_pl.cli, "evaluate_encoder", recording)
    assert main(["fit", "--config", CONFIG, *CPU, "--model.encoder=small_cnn", "--trainer.max_steps=1",
                 f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 0
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    (saved,) = (tmp_path / "run").rglob("config.yaml")  # as fit wrote it: trainer, model, weights_only, ... too
    capsys.readouterr()
    assert main(["evaluate", "-c", str(saved), "--ckpt_path", "last", "--data.init_args.image_size=16",  # the run's last.ckpt
                 "--evaluate.epochs=3", "--evaluate.device=cpu", "--evaluate.k=2", "--evaluate.temperature=0.5"]) == 0
    assert settings == [dict(device="cpu", epochs=3, k=2, temperature=0.5, augment=False, optimizer="sgd")]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"] == str(ckpt)
    assert result["data"] == "adios_pl.data.CIFAR10DataModule" and result["image_size"] == 32 and result["epochs"] == 3
    assert result["device"] == "cpu"
    assert sizes == [32], "the images were not evaluated at the size the encoder was trained at"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    evaluated = encoders[0].state_dict()
    assert evaluated and all(torch.equal(value, trained[f"encoder.{name}"]) for name, value in evaluated.items())
    data = CIFAR10DataModule(data_dir="data", image_size=32, batch_size=2, num_workers=0)
    expected = evaluate_encoder(ADIOSModule.load_from_checkpoint(ckpt).encoder, data, device="cpu", epochs=3, k=2, temperature=0.5)
    assert {key: result[key] for key in expected} == expected, (result, expected)


def test_evaluate_errors_are_one_line(stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _checkpoint(tmp_path, encoder="small_cnn", objective=HalfTemperature(scale=0.4))  # cannot be rebuilt alone
    data = ["--data=CIFAR10DataModule", "--data.num_workers=0"]
    capsys.readouterr()
    assert _exit_code(["evaluate", "--ckpt_path", str(ckpt), *data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the weights of objective but not the arguments to build it" in err[0], err
    assert _exit_code(["evaluate", *data]) == 2
    assert "required: ckpt_path" in capsys.readouterr().err
    assert _exit_code(["evaluate", "--ckpt_path", "last", *data]) == 2
    assert "--ckpt_path last needs -c <the run's config.yaml>" in capsys.readouterr().err
    assert _exit_code(["evaluate", "-c", CONFIG, "--ckpt_path", "last", *data]) == 2  # a published config: no run beside it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no checkpoint matches {ROOT / 'configs' / 'cifar10' / 'checkpoints' / 'last*.ckpt'}" in err[0], err
    assert _exit_code(["evaluate", "--help"]) == 0
    assert "--evaluate.epochs" in capsys.readouterr().out


def test_export_command_writes_the_encoder_weights(stubbed_data: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``adios-pl export -c <run config> --ckpt_path last`` writes exactly the checkpoint's
    ``encoder.*`` tensors, without the prefix, where a plain torchvision ResNet18 loads them; bad
    checkpoints are one line."""
    assert main(["fit", "--config", CONFIG, *CPU, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 0
    (ckpt,) = (tmp_path / "run").rglob("last.ckpt")
    (saved,) = (tmp_path / "run").rglob("config.yaml")
    capsys.readouterr()
    assert main(["export", "-c", str(saved), "--ckpt_path", "last"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = ckpt.parent / "last_encoder.pt"
    assert printed["out"] == str(out) and printed["checkpoint"] == str(ckpt) and printed["encoder"] == "resnet18"
    assert printed["image_size"] == 32
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    expected = {name[len("encoder."):]: value for name, value in trained.items() if name.startswith("encoder.")}
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == expected.keys() and printed["tensors"] == len(expected) > 100
    assert all(torch.equal(exported[name], expected[name]) for name in expected)
    plain = torchvision.models.resnet18()  # as the README says: the CIFAR stem at 32 px, no classifier
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool, plain.fc = torch.nn.Identity(), torch.nn.Identity()
    plain.load_state_dict(exported)  # strict: every key matches
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for args, words in ((["--ckpt_path", str(tmp_path / "empty.ckpt")], "is not a readable checkpoint (0 bytes"),
                        (["--ckpt_path", str(tmp_path / "run")], "is a folder; pass a checkpoint file"),
                        (["--ckpt_path", str(ckpt), "--out", str(ckpt)], "is the checkpoint itself"),
                        (["--ckpt_path", "last"], "--ckpt_path last needs -c")):
        assert _exit_code(["export", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)


def test_multi_gpu_example_trains_the_published_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``examples/multi_gpu.py`` says it trains the published STL10 / ResNet18 / BYOL setting with
    its rates and weights rounded: every model and augmentation value of the published config
    (``configs/stl10/byol_adios_resnet18.yaml``) is what the example builds, within 1 %. What it
    says it changes (normalisation, precision, GPUs, the batched views) is left out."""
    built: dict[str, Any] = {}

    class Recording:
        def __init__(self, **kwargs: Any) -> None:
            built["trainer"] = kwargs

        def fit(self, model: ADIOSModule, datamodule: Any) -> None:
            built["model"], built["data"] = model, datamodule

    monkeypatch.setattr(pl, "Trainer", Recording)
    monkeypatch.setattr(sys, "argv", ["multi_gpu.py"])
    runpy.run_path(str(ROOT / "examples" / "multi_gpu.py"), run_name="__main__")
    config = yaml.safe_load((ROOT / "configs" / "stl10" / "byol_adios_resnet18.yaml").read_text())
    model, data = built["model"], built["data"]
    assert type(model.objective).__name__ == "BYOL"
    for key, value in config["model"]["objective"]["init_args"].items():
        assert getattr(model.objective, key) == pytest.approx(value, rel=0.01), key
    for key, value in config["model"].items():
        if key == "objective":
            continue
        got = model.mask_generator.num_blocks if key == "mask_blocks" else model.hparams[key]
        assert got == (pytest.approx(value, rel=0.01) if isinstance(value, float) else value), key
    for key, value in config["data"]["init_args"].items():
        if key in ("data_dir", "num_workers", "mean", "std"):
            continue
        got = getattr(data, key) if hasattr(data, key) else (data.jitter | data.probabilities)[key]
        assert got == (pytest.approx(value, rel=0.01) if isinstance(value, float) else value), key
    assert built["trainer"]["max_epochs"] == config["trainer"]["max_epochs"]


def _documented_commands(path: Path) -> list[list[str]]:
    """The ``adios-pl fit`` command lines in the code blocks of ``path`` whose config is a real file
    (placeholders such as ``--config ...`` left out), as argument lists after ``fit``."""
    commands, inside = [], False
    for block_line in path.read_text().replace("\\\n", " ").splitlines():
        if block_line.startswith("```"):
            inside = not inside
            continue
        words = shlex.split(block_line.split("#", 1)[0]) if inside else []
        starts = [i for i, word in enumerate(words) if word.endswith(("adios-pl", "adios-pl)")) and words[i + 1 : i + 2] == ["fit"]]
        if starts and "..." not in block_line:
            commands.append(words[starts[0] + 2 :])
    return commands


@pytest.mark.parametrize("document", ["README.md", "examples/multi_node.md"])
def test_documented_fit_commands_parse(document: str, capsys: pytest.CaptureFixture) -> None:
    """Every ``adios-pl fit`` line the documentation shows parses with today's flags (``--print_config``:
    nothing is built), so a renamed argument cannot leave a stale command behind."""
    commands = _documented_commands(ROOT / document)
    assert len(commands) >= 2, commands
    for args in commands:
        args = [str(ROOT / arg) if arg.startswith("configs/") else arg for arg in args if arg != "--print_config"]
        assert _exit_code(["fit", *args, "--print_config"]) == 0, (args, capsys.readouterr().err)
        assert "model:" in capsys.readouterr().out


def test_readme_api_example_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two Python blocks of the README's "The API in 15 lines" build with today's names: a real
    Trainer (on the CPU, one device) and the modules, with ``fit`` recorded instead of run."""
    section = (ROOT / "README.md").read_text().split("## The API in 15 lines", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the section holds two Python blocks"
    fitted: list[tuple[Any, Any]] = []

    class OnThisMachine(pl.Trainer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**kwargs, "accelerator": "cpu", "devices": 1, "logger": False})

        def fit(self, model: Any, datamodule: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
            fitted.append((model, datamodule))

    monkeypatch.setattr(pl, "Trainer", OnThisMachine)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the project's own README)
    (stl_model, stl_data), (cpu_model, cpu_data) = fitted
    assert stl_model.num_masks == 6 and stl_model.image_size == stl_data.image_size == 96
    assert cpu_model.num_masks == 4 and cpu_model.image_size == cpu_data.image_size == 32
