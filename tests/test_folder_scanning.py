"""Untidy image trees: every case has a defined behaviour (ImageFolderDataModule, scan_folder)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adios_pl.data import ImageFolderDataModule
from adios_pl.data.folder import load_rgb, scan_folder


def _image(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _tree(root: Path, layout: dict[str, int]) -> Path:
    for folder, count in layout.items():
        for i in range(count):
            _image(root / folder / f"{i}.png")
    return root


def test_symlink_loop_and_links_into_other_classes_count_each_image_once(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 2, "b": 3})
    os.symlink(root / "a", root / "a" / "loop")  # a loop
    os.symlink(root / "b", root / "a" / "other")  # into another class
    os.symlink(tmp_path / "extra", root / "b" / "more")  # outside the tree: followed once
    _tree(tmp_path / "extra", {".": 1})
    samples, classes = scan_folder(root)
    assert classes == ["a", "b"]
    per_class = [sum(t == c for _, t in samples) for c in range(2)]
    assert per_class == [2, 4], samples


def test_hidden_and_system_folders_are_not_classes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"cat": 2, "dog": 2, "__MACOSX/cat": 2, ".thumbs": 1})
    samples, classes = scan_folder(root)
    assert classes == ["cat", "dog"] and len(samples) == 4
    unlabelled = _tree(tmp_path / "u", {"__MACOSX": 1})
    for i in range(3):
        _image(unlabelled / f"{i}.png")
    samples, classes = scan_folder(unlabelled)
    assert classes == [] and len(samples) == 3 and all(t == -1 for _, t in samples)


def test_loose_images_beside_class_folders_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"thumbnails": 2})
    for i in range(5):
        _image(root / f"{i}.png")
    with pytest.raises(ValueError, match="5 images directly and 1 sub-folders \\(thumbnails\\)"):
        scan_folder(root)


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 2, "c": 2})
    (root / "b").mkdir()
    with pytest.warns(UserWarning, match="without images left out: b"):
        samples, classes = scan_folder(root)
    assert classes == ["a", "c"] and sorted({t for _, t in samples}) == [0, 1]


def test_val_dir_must_match_train_dir(tmp_path: Path) -> None:
    unlabelled = tmp_path / "u"
    for i in range(4):
        _image(unlabelled / f"{i}.png")
    val = _tree(tmp_path / "v", {"a": 1})
    with pytest.raises(ValueError, match="val_dir=.* has class folders but train_dir=.* has none"):
        ImageFolderDataModule(str(unlabelled), val_dir=str(val)).setup("fit")
    train = _tree(tmp_path / "t", {"a": 2})
    extra = _tree(tmp_path / "v2", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match="1 class folder\\(s\\) that train_dir lacks \\(zebra\\)"):
        ImageFolderDataModule(str(train), val_dir=str(extra)).setup("fit")


def test_float_tiff_is_not_black(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(tmp_path / "half.tif")
    Image.fromarray(np.full((4, 4), 1000.0, dtype=np.float32), mode="F").save(tmp_path / "big.tif")
    assert np.asarray(load_rgb(str(tmp_path / "half.tif")))[0, 0, 0] in (127, 128)
    assert np.asarray(load_rgb(str(tmp_path / "big.tif")))[0, 0, 0] == 255
