"""Untidy image trees: every case has a defined behaviour (ImageFolderDataModule, scan_folder)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from adios_pl.data import ImageFolderDataModule
from adios_pl.data.folder import load_rgb, scan_folder, split_indices


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


@pytest.mark.parametrize("decode", ["I;16", "I"])
def test_a_dark_16_bit_image_stays_dark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode: str) -> None:
    """Values up to 255 of 65535 are nearly black, not an 8-bit image's light grey, whether Pillow
    opens the 16-bit PNG as "I;16" (10.3 and later) or as "I" (before 10.3: reproduced here)."""
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), (decode, "I;16B"))
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((4, 4), 60000, dtype=np.uint16)).save(tmp_path / "light.png")
    with Image.open(tmp_path / "dark.png") as opened:
        assert opened.mode == decode
    assert np.asarray(load_rgb(str(tmp_path / "dark.png"))).max() == 0  # 200 / 65535 * 255 = 0.78
    assert np.asarray(load_rgb(str(tmp_path / "light.png"))).min() == 233  # 60000 / 65535 * 255 = 233.5


def test_a_32_bit_image_is_scaled_by_its_depth_not_clipped_to_white(tmp_path: Path) -> None:
    """A 32-bit integer TIFF (Pillow's mode "I") with values above 16 bits: 2**30 of 2**31 - 1 is
    mid-grey and 2**24 nearly black."""
    Image.fromarray(np.array([[2**24, 2**30], [2**31 - 1, 0]], dtype=np.int32), mode="I").save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as opened:
        assert opened.mode == "I"
    assert np.asarray(load_rgb(str(tmp_path / "deep.tif")))[..., 0].tolist() == [[1, 127], [255, 0]]


def test_the_held_out_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    train, held = split_indices(50, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(50)), "every image in exactly one part"
    assert split_indices(50, 0.2, seed=3) == (train, held)
    assert len({tuple(split_indices(50, 0.2, seed)[1]) for seed in range(4)}) == 4, "the seed chooses the split"
    root = _tree(tmp_path / "t", {"a": 5, "b": 5})
    dm = ImageFolderDataModule(str(root), val_fraction=0.3, seed=1)
    dm.setup("fit")
    train_files = {dm.pretrain_set.dataset.samples[i][0] for i in dm.pretrain_set.indices}  # type: ignore[union-attr]
    held_files = {dm.eval_set.dataset.samples[i][0] for i in dm.eval_set.indices}  # type: ignore[union-attr]
    assert len(held_files) == 3 and len(train_files) == 7 and not train_files & held_files


def test_a_val_dir_with_fewer_classes_keeps_the_training_labels(tmp_path: Path) -> None:
    """val_dir lacks class "a" and holds folders that are never classes: "b" and "c" keep the
    labels 1 and 2 they have in training."""
    train = _tree(tmp_path / "t", {"a": 2, "b": 2, "c": 2})
    val = _tree(tmp_path / "v", {"b": 1, "c": 2, "__MACOSX/b": 1, ".thumbnails": 1})
    dm = ImageFolderDataModule(str(train), val_dir=str(val))
    dm.setup("fit")
    assert dm.num_classes == 3
    assert sorted((Path(path).parent.name, target) for path, target in dm.eval_set.samples) == [("b", 1), ("c", 2), ("c", 2)]  # type: ignore[union-attr]
