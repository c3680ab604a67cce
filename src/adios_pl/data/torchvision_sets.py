"""CIFAR10/100 and STL10 through torchvision's dataset classes (``download=True`` fetches them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torchvision
from torch.utils.data import ConcatDataset, Dataset

from adios_pl.data.base import SSLDataModule
from adios_pl.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, STL10_MEAN, STL10_STD, eval_transform

#: The folder torchvision reads under ``data_dir``, and where the archive comes from.
_FOLDERS = {
    "CIFAR10": ("cifar-10-batches-py", "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    "CIFAR100": ("cifar-100-python", "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    "STL10": ("stl10_binary", "stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/"),
}


def _open(factory: Any, data_dir: str, download: bool, what: str, **kwargs: Any) -> Dataset:
    """``factory(root=data_dir, download=download, **kwargs)`` with a one-line error when absent.

    A download that fails (no network) names the dataset and how to place it by hand, and
    removes the ``data_dir`` it created if that stayed empty.
    """
    root = Path(data_dir)
    existed = root.exists()
    folder, source = _FOLDERS.get(what, (what, "the dataset's archive"))
    try:
        dataset: Dataset = factory(root=data_dir, download=download, **kwargs)
        return dataset
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{what} was not found under data_dir={data_dir!r} (expected {root / folder}); pass download=True "
            "to fetch it or point data_dir at the folder holding it"
        ) from error
    except OSError as error:  # URLError, connection and DNS failures while downloading
        if not existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        reason = str(getattr(error, "reason", error)).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"could not download {what} ({reason}); place it by hand: unpack {source} so that "
            f"{root / folder} exists, then run with download=False"
        ) from error


class _TorchvisionDataModule(SSLDataModule):
    dataset_name = ""
    default_blur_prob = 0.0  # no blur on 32-px images, as in solo-learn's CIFAR settings

    def __init__(self, data_dir: str = "data", download: bool = False, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.data_dir = str(Path(data_dir))
        self.download = download

    def prepare_data(self) -> None:
        """Download once per node when ``download=True``."""
        if self.download:
            self._datasets()

    def _datasets(self) -> tuple[Dataset, Dataset]:
        factory = getattr(torchvision.datasets, self.dataset_name)
        what = self.dataset_name
        train = _open(factory, self.data_dir, self.download, what, train=True)
        test = _open(factory, self.data_dir, self.download, what, train=False)
        return train, test

    def setup(self, stage: str | None = None) -> None:
        """Pretrain on the training split; evaluate on the test split with the training split as kNN bank."""
        if self.pretrain_set is not None:
            return
        train, test = self._datasets()
        self.pretrain_set, self.eval_set, self.bank_set = train, test, train
        self.num_classes = len(train.classes)  # type: ignore[attr-defined]


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (32 px): pretrain on the 50,000 training images, evaluate on the 10,000 test images.

    Args:
        data_dir: Folder holding (or to receive) ``cifar-10-batches-py``.
        download: Fetch the data if absent.
        **kwargs: :class:`~adios_pl.data.base.SSLDataModule` arguments.
    """

    dataset_name = "CIFAR10"
    default_mean = CIFAR10_MEAN
    default_std = CIFAR10_STD


class CIFAR100DataModule(_TorchvisionDataModule):
    """CIFAR-100 (32 px), as :class:`CIFAR10DataModule`."""

    dataset_name = "CIFAR100"
    default_mean = CIFAR100_MEAN
    default_std = CIFAR100_STD


class STL10DataModule(_TorchvisionDataModule):
    """STL-10 (96 px): pretrain on train+unlabeled (105,000 images; unlabelled targets -1).

    Evaluation: the 5,000 labelled training images (kNN bank / probe training) against the
    8,000 test images.

    Args:
        data_dir: Folder holding (or to receive) ``stl10_binary``.
        download: Fetch the data if absent.
        pretrain_split: ``"train+unlabeled"`` (the paper) or ``"train"``.
        image_size: 96 by default.
        **kwargs: :class:`~adios_pl.data.base.SSLDataModule` arguments.
    """

    dataset_name = "STL10"
    default_mean = STL10_MEAN
    default_std = STL10_STD
    default_blur_prob = 0.5

    def __init__(self, data_dir: str = "data", download: bool = False, pretrain_split: str = "train+unlabeled", image_size: int = 96, **kwargs: Any) -> None:
        if pretrain_split not in ("train+unlabeled", "train"):
            raise ValueError(f"pretrain_split={pretrain_split!r} is not supported; accepted: 'train+unlabeled', 'train'")
        super().__init__(data_dir=data_dir, download=download, image_size=image_size, **kwargs)
        self.pretrain_split = pretrain_split

    def val_transform(self) -> Any:
        """Resize to ``image_size`` without a crop (the reference's ``Resize((96, 96))``: STL10
        images are 96 px already, so nothing of them is cut away)."""
        return eval_transform(self.image_size, self.mean, self.std, crop=False)

    def _datasets(self) -> tuple[Dataset, Dataset]:
        factory = torchvision.datasets.STL10
        train = _open(factory, self.data_dir, self.download, "STL10", split="train")
        test = _open(factory, self.data_dir, self.download, "STL10", split="test")
        return train, test

    def setup(self, stage: str | None = None) -> None:
        """Build the sets; the pretraining set adds the unlabelled split unless ``pretrain_split='train'``."""
        if self.pretrain_set is not None:
            return
        train, test = self._datasets()
        pretrain: Dataset = train
        if self.pretrain_split == "train+unlabeled":
            unlabeled = _open(torchvision.datasets.STL10, self.data_dir, self.download, "STL10", split="unlabeled")
            pretrain = ConcatDataset([train, unlabeled])
        self.pretrain_set, self.eval_set, self.bank_set = pretrain, test, train
        self.num_classes = len(train.classes)  # type: ignore[attr-defined]
