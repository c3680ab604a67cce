"""adios-pl: ADIOS (adversarial masking for self-supervised learning) for PyTorch Lightning.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adios_pl.module import ADIOSModule

__version__ = "0.1.0"
__all__ = ["ADIOSModule", "__version__"]


def __getattr__(name: str) -> Any:
    """``ADIOSModule`` and the modules of the package (``adios_pl.objectives``, ``adios_pl.data``,
    ...), each imported at its first use: importing the package alone imports no Lightning, so
    the ``adios-pl`` command can report a bad ``ADIOS_PL_LIGHTNING`` in one line
    (:mod:`adios_pl.console`)."""
    if name == "ADIOSModule":
        from adios_pl.module import ADIOSModule

        return ADIOSModule
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, ``ADIOSModule`` among them before its first use."""
    return sorted({*globals(), *__all__})
