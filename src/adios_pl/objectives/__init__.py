"""Pluggable SSL objectives: each owns its heads and its loss (see :class:`Objective`)."""

from adios_pl.objectives.base import Objective, ViewOutput
from adios_pl.objectives.byol import BYOL, byol_loss, momentum_tau
from adios_pl.objectives.simclr import SimCLR
from adios_pl.objectives.simsiam import SimSiam, simsiam_loss

__all__ = ["BYOL", "Objective", "SimCLR", "SimSiam", "ViewOutput", "byol_loss", "momentum_tau", "simsiam_loss"]
