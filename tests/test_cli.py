"""The command line: every shipped config runs fast_dev_run on stubbed data; user errors are one line."""

from __future__ import annotations

import json
import logging
import re
import shlex
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch._dynamo
from PIL import Image
from torch.utils.data import Dataset

from adios_pl.cli import main
from adios_pl.data import CIFAR100DataModule, ImageNet100DataModule, SSLDataModule
from adios_pl.data.torchvision_sets import _TorchvisionDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.sync_batchnorm=false",
       "--trainer.logger=false", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false"]


class FakeImages(Dataset):
    def __init__(self, n: int, size: int, classes: int) -> None:
        self.images = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return Image.fromarray(self.images[i]), i % self.classes


def fake_setup(self: SSLDataModule, stage: str | None = None) -> None:
    classes = 100 if isinstance(self, (ImageNet100DataModule, CIFAR100DataModule)) else 10
    self.pretrain_set = self.eval_set = self.bank_set = FakeImages(4, self.image_size + 8, classes)
    self.num_classes = classes


@pytest.fixture
def stubbed_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for cls in [ImageNet100DataModule, *_TorchvisionDataModule.__subclasses__(), _TorchvisionDataModule]:
        monkeypatch.setattr(cls, "setup", fake_setup)
    monkeypatch.setattr(_TorchvisionDataModule, "prepare_data", lambda self: None)
    monkeypatch.chdir(tmp_path)


def test_every_published_setting_has_a_config() -> None:
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for data in ("imagenet100_s", "stl10"):
        for encoder in ("resnet18", "vit_tiny"):
            for method in ("simclr", "byol", "simsiam"):
                assert f"{data}/{method}_adios_{encoder}.yaml" in names
                assert f"{data}/{method}_baseline_{encoder}.yaml" in names
    for method in ("simclr", "byol", "simsiam"):
        assert f"imagenet100/{method}_adios_s_resnet18.yaml" in names
    assert "stl10/simclr_random_patch_resnet18.yaml" in names and "cifar10/simclr_random_block_resnet18.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS])
def test_config_runs_fast_dev_run(config: Path, stubbed_data: None, tmp_path: Path) -> None:
    assert main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", *CPU]) == 0
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ckpt")]
    assert not written, f"fast_dev_run wrote checkpoints: {written}"  # Lightning 2.6's save_last did (100-200 MB each)


def test_print_config_and_misspelt_key(capsys: pytest.CaptureFixture, stubbed_data: None) -> None:
    config = str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert "sparsity_weight: 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--model.sparsity_wieght=1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()  # not jsonargparse's 74-line usage above the error
    assert lines[0] == "usage: adios-pl fit [-h] [options]" and len(lines) <= 3, lines  # (+ jsonargparse's tip)
    assert lines[-1] == "error: unrecognized arguments: --model.sparsity_wieght=1 -- did you mean 'model.sparsity_weight'?"


@pytest.mark.parametrize(("wrong", "right"), [
    ("adios_pl.callbacks.OnlineKNNN", "adios_pl.callbacks.OnlineKNN"),  # a class of a list (trainer.callbacks)
    ("adios_pl.callback.OnlineKNN", "adios_pl.callbacks.OnlineKNN"),  # its module
    ("adios_pl.objectives.SimCRL", "adios_pl.objectives.SimCLR"),  # a single part (model.objective)
])
def test_a_misspelt_class_path_in_a_config_names_the_closest(wrong: str, right: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "configs/cifar10/simclr_adios_resnet18.yaml").read_text().replace(f"class_path: {right}\n", f"class_path: {wrong}\n", 1))
    assert wrong in config.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(f"-- did you mean '{right}'?")


@pytest.mark.parametrize(("flag", "wrong", "right"), [
    ("--model.objective", "SimCRL", "SimCLR"),
    ("--data", "CIFAR10DataModul", "CIFAR10DataModule"),
    ("--trainer.logger", "TensorboardLogger", "TensorBoardLogger"),  # a subclass of Lightning's
    ("--model.objective", "Zzzzzz", None),
])
def test_a_misspelt_class_given_as_a_flag_names_the_closest(flag: str, wrong: str, right: str | None,
                                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml"), f"{flag}={wrong}", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.rstrip()
    assert err.endswith(f"-- did you mean '{right}'?") if right else "did you mean" not in err


@pytest.mark.parametrize(("args", "expected"), [
    ([], "a subcommand is needed: fit, validate, predict, evaluate, export, demo"),
    (["fti", "--config", "x.yaml"], "unknown subcommand 'fti' -- did you mean 'fit'?"),
    (["evalute", "--ckpt_path", "last"], "unknown subcommand 'evalute' -- did you mean 'evaluate'?"),
])
def test_a_missing_or_misspelt_subcommand_is_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    """LightningCLI alone names only fit, validate and predict; the line names all six."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_missing_data_dir_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["fit", "--config", str(ROOT / "configs/imagenet100_s/simclr_adios_resnet18.yaml"), *CPU,
                 f"--data.init_args.data_dir={tmp_path / 'nowhere'}", "--trainer.fast_dev_run=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("adios-pl: error:") and "nowhere" in err[0]


def test_a_class_that_fails_to_build_says_why_in_one_line(capsys: pytest.CaptureFixture, stubbed_data: None, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A logger whose package is missing (WandbLogger without wandb): the line gives the class's
    own reason, not jsonargparse's list of the union's other members."""
    (tmp_path / "needs_a_package.py").write_text(
        "from pytorch_lightning.loggers import CSVLogger\n"
        "class NeedsAPackage(CSVLogger):\n"
        "    def __init__(self, save_dir: str = '.') -> None:\n"
        "        raise ModuleNotFoundError(\"Requirement 'somepackage>=1.0' not met. HINT: pip install somepackage\")\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [a for a in CPU if not a.startswith("--trainer.logger")]
    code = main(["fit", "--config", str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml"), *args, "--trainer.logger=needs_a_package.NeedsAPackage"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "'needs_a_package.NeedsAPackage': Requirement 'somepackage>=1.0' not met. HINT: pip install somepackage" in err[0], err
    assert "Expected a" not in err[0], err


def test_checkpoint_of_another_objective_is_refused(capsys: pytest.CaptureFixture, stubbed_data: None, tmp_path: Path) -> None:
    from adios_pl import ADIOSModule
    from adios_pl.objectives import SimCLR

    from conftest import make_loader, quiet_trainer

    simclr = ADIOSModule(encoder="resnet18", objective=SimCLR(), num_masks=4, mask_width=32, image_size=32, warmup_epochs=0)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(simclr, make_loader(n=4, batch_size=4, size=32))
    trainer.save_checkpoint(tmp_path / "simclr.ckpt")
    byol = str(ROOT / "configs/cifar10/byol_adios_resnet18.yaml")
    code = main(["fit", "--config", byol, *CPU, "--trainer.max_steps=2", f"--ckpt_path={tmp_path / 'simclr.ckpt'}"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"objective: checkpoint 'SimCLR', this model 'BYOL'", err), err


class _Lines(logging.Handler):
    """The messages logged to the logger it is added to."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_demo_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The demo runs and reports; it shows no warning about Lightning's own code (Lightning 2.6
    under torch 2.14 warns of a deprecated pytree API at the first batch), and not Lightning's
    advert for its cloud logger among Lightning's report of the devices."""
    lightning_log = logging.getLogger(f"{pl.__name__}.utilities.rank_zero")  # where rank_zero_info logs
    lines = _Lines()
    lightning_log.addHandler(lines)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # what a user sees, without the test configuration's filters
            assert main(["demo", "--tiny", "--max-steps", "3", "--out", str(tmp_path / "demo")]) == 0
    finally:
        lightning_log.removeHandler(lines)
    internal = [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
    assert not internal, internal
    assert any(line.startswith("GPU available: ") for line in lines.lines), lines.lines
    assert not [line for line in lines.lines if "Tip:" in line or "litlogger" in line], lines.lines
    out = capsys.readouterr().out
    for row in ("kNN top-1", "linear top-1", "mask FG-ARI", "random 8-px patch FG-ARI", "training images/s"):
        assert row in out
    assert (tmp_path / "demo" / "masks.png").exists()
    assert (tmp_path / "demo" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "demo" / "demo_results.json").exists()
    from adios_pl import ADIOSModule  # the checkpoint the demo points a new user to loads alone

    loaded = ADIOSModule.load_from_checkpoint(tmp_path / "demo" / "checkpoints" / "last.ckpt")
    assert type(loaded.objective).__name__ == "SimCLR" and loaded.objective.temperature == 0.2  # type: ignore[union-attr]
    # the command it prints for the offline scores gives the table's figures
    (command,) = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("offline scores:")]
    args = shlex.split(command)
    assert args[:2] == ["adios-pl", "evaluate"], command
    assert main([*args[1:], "--evaluate.device=cpu", "--data.num_workers=0"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = json.loads((tmp_path / "demo" / "demo_results.json").read_text())["after"]
    assert (scored["linear_top1"], scored["knn_top1"]) == (after["linear_top1"], after["knn_top1"]), (scored, after)


def test_demo_lays_its_schedule_over_the_batches_its_budget_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``--max-steps`` the demo times a copy and trains the batches that fit; its learning
    rates end annealed. The planned count is replaced by 5 here, so the test does not depend on
    this machine's speed."""
    from adios_pl import demo

    plans: list[tuple[int, float]] = []
    real_plan = demo.plan_batches

    def plan(seconds: float, **kwargs: Any) -> tuple[int, float]:
        plans.append(real_plan(seconds, **kwargs))
        return 5, plans[-1][1]

    monkeypatch.setattr(demo, "plan_batches", plan)
    result = demo.run_demo(out=str(tmp_path / "demo"), minutes=10, tiny=True)
    ((planned, spent),) = plans
    assert planned > 2 and 0 < spent < 600, plans  # the tiny demo's warm-up is 2 batches
    assert result["steps"] == 5
    checkpoint = torch.load(tmp_path / "demo" / "checkpoints" / "last.ckpt", weights_only=False)
    for scheduler in checkpoint["lr_schedulers"]:  # the encoder's and the mask generator's
        assert scheduler["last_epoch"] == 5 and max(scheduler["_last_lr"]) < 1e-9, scheduler


def test_batches_that_fit_match_a_clock_run_batch_by_batch() -> None:
    """The closed form against a clock advanced batch by batch, a validation after each epoch."""
    from adios_pl.demo import batches_that_fit

    def by_clock(seconds: float, batch: float, validation: float, per_epoch: int) -> int:
        clock = batches = 0
        while clock + batch <= seconds:
            clock += batch
            batches += 1
            if batches % per_epoch == 0:
                clock += validation
        return max(1, batches)

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        seconds, batch, validation = (float(x) for x in torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([300.0, 3.0, 20.0], dtype=torch.float64))
        per_epoch = int(torch.randint(1, 80, (1,), generator=g))
        batch += 1e-3
        assert batches_that_fit(seconds, batch, validation, per_epoch) == by_clock(seconds, batch, validation, per_epoch)
    assert batches_that_fit(10.0, 1.0, 0.0, 4) == 10 and batches_that_fit(0.5, 1.0, 0.0, 4) == 1
    with pytest.raises(ValueError, match="batch_seconds"):
        batches_that_fit(10.0, 0.0, 1.0, 4)


def test_batch_clock_and_the_whole_validation_it_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Intervals between batch ends (the first after each start untimed), each evaluation loader
    apart, and a validation's whole time; a whole validation adds the unreached batches at each
    loader's median."""
    from adios_pl import demo

    now = iter([1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 9.0, 10.0, 13.0, 14.0])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(now))
    clock = demo.BatchClock(stop_after_validation=True)
    trainer = SimpleNamespace(should_stop=False)
    for index in range(3):  # training batches end at 1, 2, 4
        clock.on_train_batch_end(trainer, None, None, None, index)  # type: ignore[arg-type]
    clock.on_validation_start(trainer, None)  # type: ignore[arg-type]  # at 5
    for loader, index in ((0, 0), (0, 1), (1, 0), (1, 1), (1, 2)):  # at 6, 7 and 9, 10, 13
        clock.on_validation_batch_end(trainer, None, None, None, index, loader)  # type: ignore[arg-type]
    clock.on_validation_end(trainer, None)  # type: ignore[arg-type]  # at 14
    assert clock.train == [1.0, 2.0] and clock.val == {0: [1.0], 1: [1.0, 3.0]}
    assert clock.validation_seconds == 9.0 and trainer.should_stop
    # loader 0: 2 of 10 batches reached, 8 more at 1 s; loader 1: 3 of 3; a loader never reached: free
    assert demo.whole_validation_seconds(clock, [10, 3, 5]) == 9.0 + 8 * 1.0


def test_demo_speed_counts_images_not_views() -> None:
    """Three batches of 16 images, each with two views: 48 images, timed over the batches only."""
    from adios_pl.demo import TrainSpeed

    speed = TrainSpeed()
    batch = ((torch.zeros(16, 3, 8, 8), torch.zeros(16, 3, 8, 8)), torch.zeros(16, dtype=torch.long))
    for index in range(3):
        speed.on_train_batch_start(None, None, batch, index)  # type: ignore[arg-type]
        speed.on_train_batch_end(None, None, None, batch, index)  # type: ignore[arg-type]
    assert speed.images == 48 and speed.seconds > 0
    assert speed.images_per_second == pytest.approx(48 / speed.seconds)


def test_demo_random_patch_baseline_does_not_depend_on_the_model() -> None:
    """Two models of different seeds: their masks score differently, the random patches alike."""
    from adios_pl.demo import demo_parts, measure

    first, data = demo_parts(tiny=True, seed=0)
    second, _ = demo_parts(tiny=True, seed=1)
    data.setup("fit")
    second.encoder.eval()
    modes = [m.training for m in second.modules()]
    a, b = measure(first, data, probe_epochs=1), measure(second, data, probe_epochs=1)
    assert first.training and all(m.training for m in first.modules())
    assert [m.training for m in second.modules()] == modes, "measure changed the model's modes"
    assert a["mask_fg_ari"] != b["mask_fg_ari"]
    assert a["random_patch_fg_ari"] == b["random_patch_fg_ari"]


def test_readme_quickstart_matches_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert len(commands) == 2, "the Quickstart block holds exactly two commands"
    assert "adios-pl demo" in commands[0]
    assert "pytest" in commands[1]
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without GPUs")
def test_more_devices_than_available_is_one_line(capsys: pytest.CaptureFixture, stubbed_data: None) -> None:
    args = [a for a in CPU if not a.startswith(("--trainer.accelerator", "--trainer.devices"))]
    code = main(["fit", "--config", str(ROOT / "configs/cifar10/simclr_adios_resnet18.yaml"), *args,
                 "--trainer.accelerator=gpu", "--trainer.devices=8", "--trainer.fast_dev_run=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("adios-pl: error:"), err
    assert "trainer.accelerator is 'gpu'" in err[0] and "pass --trainer.accelerator cpu" in err[0], err


def test_readme_fast_path_command_runs(stubbed_data: None, graphs_per_part: Counter[str]) -> None:
    """The README's GPU fast-path command parses and trains a step, its three parts compiled
    without graph breaks (on the CPU, by dynamo with graphs run eagerly, ``graphs_per_part``, so
    that it takes seconds)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1].replace("\\\n", " ")
    (command,) = [line for line in block.splitlines() if "augment_on device" in line]
    args = shlex.split(command)
    assert args[:3] == ["adios-pl", "fit", "--config"]
    args[3] = str(ROOT / args[3])  # relative to the repository (the test runs in a temporary folder)
    assert main([*args[1:], "--trainer.fast_dev_run=1", *CPU]) == 0
    assert set(graphs_per_part) == {"DeviceAugmentation", "MaskGenerator", "ResNet"}, graphs_per_part
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
