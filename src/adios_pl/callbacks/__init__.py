"""Evaluation while training: online linear probe, kNN, mask pictures and mask quality."""

from adios_pl.callbacks.features import FeatureWriter
from adios_pl.callbacks.knn import OnlineKNN
from adios_pl.callbacks.linear_probe import OnlineLinearProbe
from adios_pl.callbacks.masks import MaskQuality, MaskVisualizer, mask_grid

__all__ = ["FeatureWriter", "MaskQuality", "MaskVisualizer", "OnlineKNN", "OnlineLinearProbe", "mask_grid"]
