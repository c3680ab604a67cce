"""The library on either Lightning package: ``pytorch_lightning`` (the default) or the unified
``lightning`` (``lightning.pytorch``), chosen as :mod:`adios_pl.backend` says."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adios_pl import ADIOSModule
from adios_pl.backend import ENV_VAR, PACKAGE, choose_package, mixed_packages_warning
from adios_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
BOTH = {"pytorch_lightning", "lightning"}
# not imported here: this process stays on one package (importing the other makes each module warn)
UNIFIED = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs the lightning package (in the test extra)")

# A script as a user of the unified package writes it: `lightning` imported first, its Trainer,
# callbacks and logger; a second run resumes the first through find_last_checkpoint.
SCRIPT = """
import json, sys
import lightning as L
from adios_pl import ADIOSModule, backend
from adios_pl.callbacks import MaskVisualizer, OnlineKNN, OnlineLinearProbe
from adios_pl.checkpoint import AtomicCheckpointIO
from adios_pl.data import ShapesDataModule
from adios_pl.resume import find_last_checkpoint

def fit(epochs):
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=L.pytorch.loggers.CSVLogger("runs"), plugins=[AtomicCheckpointIO()],
                        callbacks=[OnlineLinearProbe(num_classes=4), OnlineKNN(k=3), MaskVisualizer(num_images=2),
                                   L.pytorch.callbacks.ModelCheckpoint(save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False)
    resumed = find_last_checkpoint(trainer)
    trainer.fit(ADIOSModule(encoder="small_cnn", num_masks=2, image_size=32, warmup_epochs=0),
                datamodule=ShapesDataModule(train_size=32, val_size=8, batch_size=8, num_workers=0), ckpt_path=resumed)
    return {"resumed": resumed, "step": trainer.global_step, "metrics": sorted(trainer.callback_metrics)}

runs = [fit(1), fit(2)]
loaded = ADIOSModule.load_from_checkpoint("runs/lightning_logs/version_1/checkpoints/last.ckpt")
print(json.dumps({"package": backend.PACKAGE, "runs": runs, "loaded": type(loaded).__name__,
                  "other_imported": "pytorch_lightning" in sys.modules or "lightning_fabric" in sys.modules}))
"""


def test_choose_package_follows_the_variable_then_the_script() -> None:
    assert choose_package({}, set(), BOTH) == "pytorch_lightning"
    assert choose_package({}, {"lightning", "lightning.pytorch"}, BOTH) == "lightning"  # `import lightning as L` first
    assert choose_package({}, {"lightning.pytorch", "pytorch_lightning"}, BOTH) == "pytorch_lightning"
    assert choose_package({}, set(), {"lightning"}) == "lightning"  # installed without pytorch_lightning
    assert choose_package({ENV_VAR: "lightning"}, {"pytorch_lightning"}, BOTH) == "lightning"
    assert choose_package({ENV_VAR: "pytorch_lightning"}, {"lightning.pytorch"}, BOTH) == "pytorch_lightning"
    with pytest.raises(ImportError, match=rf"{ENV_VAR}='lightning.pytorch': accepted values are 'pytorch_lightning', 'lightning'"):
        choose_package({ENV_VAR: "lightning.pytorch"}, set(), BOTH)


def test_the_command_line_reports_a_bad_variable_in_one_line(tmp_path: Path) -> None:
    """The console script chooses the package before it imports the command line, so a bad
    ``ADIOS_PL_LIGHTNING`` is a user error like the others: one line, exit code 2 (it was a
    traceback from the import of the library). Importing ``adios_pl`` alone imports no Lightning."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="adios-pl")
    assert script.value == "adios_pl.console:console_main"
    env = {**os.environ, ENV_VAR: "lightening"}
    env.pop("ADIOS_PL_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "adios_pl", "demo", "--tiny", f"--out={tmp_path}"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [f"adios-pl: error: {ENV_VAR}='lightening': accepted values are 'pytorch_lightning', 'lightning'"], done.stderr
    probe = "import sys, adios_pl; print(sorted(m for m in sys.modules if 'lightning' in m))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done


def test_a_bare_import_gives_the_modules_at_first_use() -> None:
    """After ``import adios_pl`` alone, ``ADIOSModule`` and every module of the package are there
    when first named (``objectives``, ``masks``, ``encoders`` were there only as a side effect of
    importing ``ADIOSModule``, and ``data``, ``callbacks``, ``cli`` were not)."""
    names = "adios_pl.ADIOSModule, adios_pl.objectives.SimCLR, adios_pl.data.ShapesDataModule, adios_pl.callbacks.OnlineKNN, adios_pl.cli.main"
    probe = f"import adios_pl; print([f'{{x.__module__}}.{{x.__name__}}' for x in ({names})]); adios_pl.no_such_name"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != ENV_VAR})
    assert done.stdout.strip() == str(["adios_pl.module.ADIOSModule", "adios_pl.objectives.simclr.SimCLR",
                                       "adios_pl.data.shapes.ShapesDataModule", "adios_pl.callbacks.knn.OnlineKNN", "adios_pl.cli.main"]), done
    assert done.stderr.strip().endswith("AttributeError: module 'adios_pl' has no attribute 'no_such_name'"), done.stderr


def test_a_module_warns_when_the_other_package_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    other = "lightning.pytorch" if PACKAGE == "pytorch_lightning" else "pytorch_lightning"
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delitem(sys.modules, other, raising=False)
    assert mixed_packages_warning(os.environ, sys.modules) is None
    monkeypatch.setitem(sys.modules, other, sys.modules[__name__])
    message = mixed_packages_warning(os.environ, sys.modules)
    assert message is not None and f"a Trainer, callback or logger from {other} refuses" in message
    with pytest.warns(UserWarning, match=f"{ENV_VAR}={'lightning' if PACKAGE == 'pytorch_lightning' else 'pytorch_lightning'} in"):
        ADIOSModule(encoder="small_cnn", num_masks=2, image_size=32)
    monkeypatch.setenv(ENV_VAR, PACKAGE)  # chosen knowingly: nothing to say
    assert mixed_packages_warning(os.environ, sys.modules) is None


@UNIFIED
def test_a_script_on_the_unified_lightning_package(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["package"] == "lightning" and report["loaded"] == "ADIOSModule"
    assert not report["other_imported"], "a module of the library imported pytorch_lightning or lightning_fabric"
    first, second = report["runs"]
    assert first["resumed"] is None and first["step"] == 2
    assert second["resumed"].endswith(os.path.join("version_0", "checkpoints", "last.ckpt")) and second["step"] == 4
    for key in ("val/knn_top1", "val/linear_top1", "train/mask_loss"):
        assert key in second["metrics"]
    assert list((tmp_path / "runs/lightning_logs/version_1").rglob("*.png")), "MaskVisualizer drew nothing"


@UNIFIED
def test_the_command_line_on_the_unified_lightning_package(tmp_path: Path) -> None:
    env = {**os.environ, ENV_VAR: "lightning"}
    cli = ("import sys; from adios_pl.cli import main; code = main(sys.argv[1:]); "
           "assert 'pytorch_lightning' not in sys.modules, 'pytorch_lightning imported'; sys.exit(code)")
    small = ["--data=ShapesDataModule", "--data.train_size=16", "--data.val_size=8", "--data.batch_size=8",
             "--data.num_workers=0", "--model.encoder=small_cnn", "--trainer.accelerator=cpu", "--trainer.devices=1",
             "--trainer.precision=32-true", "--trainer.sync_batchnorm=false", "--trainer.enable_progress_bar=false",
             "--trainer.default_root_dir=run"]
    fit = subprocess.run([sys.executable, "-c", cli, "fit", "--config", "configs/cifar10/simclr_adios_resnet18.yaml",
                          "--trainer.max_epochs=1", *small], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "run/lightning_logs/version_0"
    assert "class_path: lightning.pytorch.callbacks.ModelCheckpoint" in (run / "config.yaml").read_text()
    validate = subprocess.run([sys.executable, "-c", cli, "validate", "--config", str(run / "config.yaml"), "--ckpt_path=last"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "val/knn_top1" in validate.stdout
    # resumed on pytorch_lightning (the default) from the checkpoint written on lightning
    default = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    resume = subprocess.run([sys.executable, "-m", "adios_pl.cli", "fit", "--config", "configs/cifar10/simclr_adios_resnet18.yaml",
                             "--trainer.max_epochs=2", *small, "--ckpt_path=last"], cwd=tmp_path, env=default,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    # version_1 is validate's (logs only); the resumed fit writes version_2
    steps = [torch.load(tmp_path / f"run/lightning_logs/version_{v}/checkpoints/last.ckpt", weights_only=True)["global_step"]
             for v in (0, 2)]
    assert steps[0] > 0 and steps[1] == 2 * steps[0], steps

    # the checkpoint loads in this process, which is on the other package (or on the same)
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    model = ADIOSModule.load_from_checkpoint(run / "checkpoints/last.ckpt")
    assert type(model.objective).__name__ == "SimCLR"
    ours = {"pytorch_lightning": "pytorch_lightning.cli.instantiate_module", "lightning": "lightning.pytorch.cli.instantiate_module"}
    assert model.hparams["_instantiator"] == ours[PACKAGE]  # so its own checkpoints load here too
    state = model.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(state[key], value) for key, value in checkpoint["state_dict"].items())


@pytest.mark.parametrize("quoted", [False, True], ids=["yaml", "json"])
def test_a_config_of_the_other_package_is_one_line(quoted: bool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run's config.yaml names the callbacks of the package it ran on; under the other package
    the command line says which variable to set instead of printing jsonargparse's usage."""
    other, module = {"pytorch_lightning": ("lightning", "lightning.pytorch"), "lightning": ("pytorch_lightning", "pytorch_lightning")}[PACKAGE]
    config = tmp_path / ("config.json" if quoted else "config.yaml")
    config.write_text(f'{{"trainer": {{"callbacks": [{{"class_path": "{module}.callbacks.ModelCheckpoint"}}]}}}}' if quoted
                      else f"trainer:\n  callbacks:\n  - class_path: {module}.callbacks.ModelCheckpoint\n")
    assert main(["validate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"names {module}.callbacks.ModelCheckpoint" in err[0] and f"{ENV_VAR}={other}" in err[0], err
