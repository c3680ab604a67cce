"""Runs the test suite on the unified ``lightning`` package (by hand, not in CI):

    ADIOS_PL_LIGHTNING=lightning PYTHONPATH=$PWD/scripts/lightning_alias pytest

The tests import ``pytorch_lightning`` and ``lightning_fabric`` as a user's script would. On
``PYTHONPATH``, this file is read at the start of every Python process (subprocesses and DDP
ranks included) and makes each such import return the unified package's module of the same
path (``lightning.pytorch.*``, ``lightning.fabric.*``), so the tests and the library use the
same classes; ``ADIOS_PL_LIGHTNING`` builds the library on them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Sequence

ALIASES = {"pytorch_lightning": "lightning.pytorch", "lightning_fabric": "lightning.fabric"}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``pytorch_lightning.x`` as the already imported ``lightning.pytorch.x``."""

    def __init__(self) -> None:
        self.modules: dict[str, ModuleType] = {}

    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> ModuleSpec | None:
        root, _, rest = name.partition(".")
        if root not in ALIASES:
            return None
        module = importlib.import_module(ALIASES[root] + (f".{rest}" if rest else ""))
        self.modules[name] = module
        return importlib.util.spec_from_loader(name, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return self.modules.pop(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported under its own name."""


sys.meta_path.insert(0, _Alias())
