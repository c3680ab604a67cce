"""configs/ are the published settings: generated from the CSV, and resolved by the CLI to its values."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from adios_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED_CSV = ROOT.parent / "shared" / "docs" / "published" / "published_settings_long.csv"


def _make_configs() -> Any:
    spec = importlib.util.spec_from_file_location("make_configs", ROOT / "scripts" / "make_configs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_configs"] = module
    spec.loader.exec_module(module)
    return module


MAKE = _make_configs()
SCRIPTS = MAKE.published()


def test_committed_configs_are_what_the_generator_writes() -> None:
    generated = MAKE.all_configs()
    for path, text in generated.items():
        assert (ROOT / path).read_text() == text, f"{path} differs from scripts/make_configs.py's output; rerun it"
    committed = {p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")}
    assert committed == set(generated), f"configs not made by the generator: {sorted(committed - set(generated))}"


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="the shared published-settings table is not beside the checkout")
def test_csv_copy_equals_the_shared_table() -> None:
    assert filecmp.cmp(ROOT / "configs" / "published_settings_long.csv", SHARED_CSV, shallow=False)


def test_every_column_is_a_knob_a_choice_or_documented() -> None:
    columns = {c for settings in SCRIPTS.values() for c in settings}
    covered = set(MAKE.KNOBS) | set(MAKE.CHOICES) | set(MAKE.NO_KNOB)
    assert len(SCRIPTS) == 15
    assert columns <= covered, f"columns with no mapping: {sorted(columns - covered)}"


def _config_path(settings: dict[str, str]) -> Path:
    method, _, kind = settings["method"].partition("_")
    return ROOT / "configs" / MAKE.DATA[settings["dataset"]][0] / f"{method}_{kind}_{settings['backbone']}.yaml"


def _resolved(path: Path, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    out: dict[str, Any] = yaml.safe_load(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("script", sorted(SCRIPTS), ids=[s.split("training/")[-1] for s in sorted(SCRIPTS)])
def test_print_config_equals_the_published_values(script: str, capsys: pytest.CaptureFixture) -> None:
    settings = SCRIPTS[script]
    resolved = _resolved(_config_path(settings), capsys)
    checked = 0
    for column, (key, convert) in MAKE.KNOBS.items():
        if settings[column] in ("n/a", ""):
            continue
        value = MAKE.get(resolved, key)
        expected = convert(settings[column])
        assert (list(value) if isinstance(value, tuple) else value) == expected, f"{column}: config {value!r}, published {expected!r}"
        checked += 1
    assert checked >= 35
    model = resolved["model"]
    assert model["optimizer"] == "lars" and model["schedule_interval"] == "epoch"
    assert model["mask_mode"] == ("one" if settings["method"].endswith("adios_s") else "all")


def test_spot_values_read_by_hand(capsys: pytest.CaptureFixture) -> None:
    """A few values copied by hand from published_settings.md, independent of the generator's table."""
    simsiam = _resolved(ROOT / "configs/stl10/simsiam_adios_resnet18.yaml", capsys)
    assert simsiam["model"]["lr"] == 0.4436168048573669
    assert simsiam["model"]["weight_decay"] == 7.227625739330174e-06
    assert simsiam["model"]["mask_blocks"] == 5 and simsiam["trainer"]["precision"] == "32-true"
    args = simsiam["model"]["objective"]["init_args"]
    assert (args["use_symmetry_mask"], args["use_no_mask"], args["use_both_mask"]) == (False, True, False)
    assert args["proj_output_dim"] == 256 and args["mask_both_views"] and args["constant_predictor_lr"]
    assert simsiam["data"]["init_args"]["brightness"] == 0.5521874334305088
    assert list(simsiam["data"]["init_args"]["mean"]) == [0.4914, 0.4823, 0.4466]
    vit = _resolved(ROOT / "configs/stl10/simclr_adios_vit_tiny.yaml", capsys)
    assert vit["model"]["objective"]["init_args"]["proj_output_dim"] == 128
    assert vit["model"]["weight_decay"] == 0.0001
    in100s = _resolved(ROOT / "configs/imagenet100_s/simclr_adios_resnet18.yaml", capsys)
    assert in100s["model"]["mask_norm"] == "in" and in100s["model"]["entropy_weight"] == 0.711773255433044
    assert in100s["data"]["init_args"]["image_size"] == 96 and list(in100s["data"]["init_args"]["std"]) == [0.228, 0.224, 0.225]
    byol_s = _resolved(ROOT / "configs/imagenet100/byol_adios_s_resnet18.yaml", capsys)
    assert byol_s["model"]["num_masks"] == 6 and byol_s["model"]["mask_lr"] == 0.12952098519347935
    assert (byol_s["data"]["init_args"]["brightness"], byol_s["data"]["init_args"]["hue"]) == (0.5, 0.05)


def test_the_package_ships_every_published_config(tmp_path: Path) -> None:
    """What an install puts in the package (setuptools' ``build_py``, the step that picks a wheel's
    files, run on a copy of the source) holds every config of ``configs/``, byte for byte."""
    import shutil
    import subprocess

    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = {p.relative_to(tmp_path / "lib" / "adios_pl" / "configs") for p in (tmp_path / "lib" / "adios_pl" / "configs").rglob("*.yaml")}
    published = {p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == published and len(published) == 52, sorted(published ^ shipped)
    for name in published:
        assert filecmp.cmp(ROOT / "configs" / name, tmp_path / "lib" / "adios_pl" / "configs" / name, shallow=False), name


def test_published_config_paths_work_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``--config configs/<dataset>/<name>.yaml`` outside the repository (a wheel install has no
    ``configs/`` folder) is the shipped config; a misspelt one is one line naming the closest."""
    here = ROOT / "configs" / "stl10" / "byol_adios_resnet18.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(here), "--print_config"])
    expected = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    for args in (["--config", "configs/stl10/byol_adios_resnet18.yaml"], ["-c", "configs/stl10/byol_adios_resnet18.yaml"],
                 ["--config=configs/stl10/byol_adios_resnet18.yaml"]):
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        assert capsys.readouterr().out == expected, args
    assert main(["fit", "--config", "configs/stl10/byol_adios_resnt18.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adios-pl: error: --config configs/stl10/byol_adios_resnt18.yaml: no such file -- did you mean "
                   "'configs/stl10/byol_adios_resnet18.yaml'?"], err
    (tmp_path / "configs" / "stl10").mkdir(parents=True)  # a file of the user's own wins over the shipped one
    assert "max_epochs: 400" in here.read_text()
    (tmp_path / "configs" / "stl10" / "byol_adios_resnet18.yaml").write_text(here.read_text().replace("max_epochs: 400", "max_epochs: 7"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/stl10/byol_adios_resnet18.yaml", "--print_config"])
    assert "max_epochs: 7" in capsys.readouterr().out
