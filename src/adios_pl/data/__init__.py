"""DataModules: two-view training batches ``((view_1, view_2), targets)`` and evaluation loaders.

``val_dataloader()`` of every DataModule returns ``[evaluation split, labelled training images]``
under the evaluation transform; the second is the kNN memory bank.
"""

from adios_pl.data.base import SSLDataModule, Transformed
from adios_pl.data.folder import CorruptImageError, ImageFiles, ImageFolderDataModule, ImageNet100DataModule, imagenet100_classes, load_rgb
from adios_pl.data.shapes import SHAPES, ShapesDataModule, ShapesDataset, render_scene
from adios_pl.data.torchvision_sets import CIFAR10DataModule, CIFAR100DataModule, STL10DataModule
from adios_pl.data.transforms import TwoViews, eval_transform, pretrain_transform

__all__ = [
    "CIFAR100DataModule", "CIFAR10DataModule", "CorruptImageError", "ImageFiles", "ImageFolderDataModule",
    "ImageNet100DataModule", "SHAPES", "SSLDataModule", "STL10DataModule", "ShapesDataModule", "ShapesDataset",
    "Transformed", "TwoViews", "eval_transform", "imagenet100_classes", "load_rgb", "pretrain_transform", "render_scene",
]
