"""Errors a user causes with settings or data that are only found while running.

The command line shows these as one line (``adios-pl: error: ...``); any other exception raised
while training is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Marks an error in the user's settings, data or checkpoint."""


class ConfigurationError(UserInputError, ValueError):
    """A setting, a data set or a checkpoint that cannot work (a ``ValueError``)."""


class BatchFormatError(UserInputError, TypeError):
    """A batch that is not in the documented format (a ``TypeError``)."""


class LightningPackageError(UserInputError, ImportError):
    """``ADIOS_PL_LIGHTNING`` names no Lightning package that adios-pl can build on (an
    ``ImportError``: it is raised while :mod:`adios_pl.backend` is imported)."""
