"""Which Lightning package adios-pl is built on: ``pytorch_lightning`` or the unified ``lightning``.

Lightning ships the same code twice: as ``pytorch_lightning`` (with ``lightning_fabric``) and
inside ``lightning`` (``lightning.pytorch``, ``lightning.fabric``). The classes of one are not
the classes of the other, and a Trainer refuses a module, callback or logger of the other
package. So the library is built on one of them per process, chosen once, when this module is
first imported: by the first import of ``ADIOSModule`` or of another part of the library that
uses Lightning (the callbacks, the DataModules, the command line, ...):

1. ``ADIOS_PL_LIGHTNING=lightning`` or ``=pytorch_lightning`` in the environment, when set;
2. else ``lightning``, when the script imported ``lightning`` before adios-pl and not
   ``pytorch_lightning`` (``import lightning as L`` then ``from adios_pl import ADIOSModule``);
3. else ``pytorch_lightning`` (a dependency of adios-pl, so always there after ``pip install``).

Every other module of the library imports Lightning's names from here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Container, Mapping

from adios_pl.errors import LightningPackageError

#: The environment variable that chooses the package.
ENV_VAR = "ADIOS_PL_LIGHTNING"

#: The accepted packages, each with the module names of its trainer and fabric halves.
PACKAGES = {"pytorch_lightning": ("pytorch_lightning", "lightning_fabric"), "lightning": ("lightning.pytorch", "lightning.fabric")}


def choose_package(environ: Mapping[str, str], imported: Container[str], installed: Container[str] = PACKAGES) -> str:
    """The Lightning package to build on (a key of :data:`PACKAGES`), by the rules of this
    module's docstring: ``environ`` is the environment, ``imported`` the modules already imported
    (``sys.modules``), ``installed`` the packages that can be imported."""
    chosen = environ.get(ENV_VAR, "").strip()
    if chosen:
        if chosen not in PACKAGES:
            raise LightningPackageError(f"{ENV_VAR}={chosen!r}: accepted values are {', '.join(map(repr, PACKAGES))}")
        return chosen
    if "lightning.pytorch" in imported and "pytorch_lightning" not in imported:
        return "lightning"
    return "pytorch_lightning" if "pytorch_lightning" in installed else "lightning"


def _installed() -> set[str]:
    return {name for name in PACKAGES if importlib.util.find_spec(name) is not None}


#: The package this process uses: ``"pytorch_lightning"`` or ``"lightning"``.
PACKAGE = choose_package(os.environ, sys.modules, _installed())
#: The other package, whose classes this process's do not mix with, and its trainer module.
OTHER_PACKAGE = next(name for name in PACKAGES if name != PACKAGE)
OTHER = PACKAGES[OTHER_PACKAGE][0]

# Type checkers read the pytorch_lightning names: both packages have the same API.
if TYPE_CHECKING or PACKAGE == "pytorch_lightning":
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning_fabric.utilities.cloud_io import get_filesystem
    from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
    from pytorch_lightning.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml, pl_load
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.trainer.states import TrainerFn
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
else:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml, pl_load
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "ENV_VAR", "PACKAGES", "PACKAGE", "OTHER_PACKAGE", "OTHER", "choose_package", "mixed_packages_warning", "pl", "TorchCheckpointIO",
    "get_filesystem", "BasePredictionWriter", "ModelCheckpoint", "LightningArgumentParser", "LightningCLI",
    "load_hparams_from_tags_csv", "load_hparams_from_yaml", "pl_load", "TensorBoardLogger", "TrainerFn",
    "MisconfigurationException", "rank_zero_info", "rank_zero_warn",
]


def mixed_packages_warning(environ: Mapping[str, str], imported: Container[str]) -> str | None:
    """The warning for a process that imported the other Lightning package too (a Trainer taken
    from it would refuse the library's classes), or ``None``. Nothing when the package was
    chosen with :data:`ENV_VAR`: the choice was made knowingly."""
    if environ.get(ENV_VAR, "").strip() or OTHER not in imported:
        return None
    name = PACKAGES[PACKAGE][0]
    return (
        f"adios-pl is built on {name} in this process, and {OTHER} is imported too: a Trainer, "
        f"callback or logger from {OTHER} refuses adios-pl's classes. Take them from {name}, or set "
        f"{ENV_VAR}={OTHER_PACKAGE} in the environment to build adios-pl on {OTHER} (see adios_pl.backend)"
    )
