"""Checkpoint I/O that never leaves a truncated file and loads checkpoints as data, not code;
the checks before a model is built from a checkpoint's hyper-parameters."""

from __future__ import annotations

import inspect
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from adios_pl.backend import PACKAGES, TorchCheckpointIO, get_filesystem, load_hparams_from_tags_csv, load_hparams_from_yaml, pl, pl_load
from adios_pl.errors import ConfigurationError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, ``fsync`` it, then ``os.replace`` it.

    A process killed while saving leaves the previous checkpoint (e.g. ``last.ckpt``) intact.
    Loading uses ``torch.load(weights_only=True)`` unless told otherwise: a checkpoint is data,
    not code. A Trainer plugin: ``adios-pl`` and the demo install it; in a script pass
    ``pl.Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Temporary files that killed processes left beside ``path`` (``.NAME.tmpPID`` of a PID
        that no longer runs) are removed first; a failed write (a full disk) names the path and
        the free space instead of torch's ``inline_container`` message.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except (OSError, RuntimeError) as error:
            free = shutil.disk_usage(target.parent).free / 2**20
            raise OSError(
                f"could not write the checkpoint {target} ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}); "
                f"{free:.0f} MiB free on its disk. The previous checkpoint there is intact."
            ) from error
        finally:
            if temporary.exists():
                temporary.unlink()

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` by default; an empty or truncated file, or a folder, is a clear error."""
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        refuse_folder(path)
        try:
            with fs.open(path, "rb") as f:  # not super(): its weights_only argument is new in Lightning 2.6
                checkpoint: dict[str, Any] = torch.load(f, map_location=map_location, weights_only=True if weights_only is None else weights_only)
                return checkpoint
        except UNREADABLE as error:
            raise unreadable_checkpoint(path, error) from error


def refuse_folder(path: Any) -> None:
    """Raise :class:`ConfigurationError` naming ``path`` when it is a local folder, which ``torch.load``
    would refuse with a bare ``IsADirectoryError``."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        raise ConfigurationError(f"{path} is a folder; pass a checkpoint file (a .ckpt in it)")


#: What ``torch.load`` raises for a file that is not a checkpoint it may read.
UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError)


def unreadable_checkpoint(path: Any, error: BaseException) -> ConfigurationError:
    """The error to show for ``path``, which ``torch.load`` refused with ``error`` (one of
    :data:`UNREADABLE`): a file holding objects beyond weights, or one that is empty or truncated."""
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        found = next((line.split("Unsupported global:")[1].split(" was not")[0].replace("GLOBAL", "").strip()
                      for line in str(error).splitlines() if "Unsupported global:" in line), "")
        return ConfigurationError(
            f"{path} holds Python objects beyond tensors and plain containers{f' (the first: {found})' if found else ''}, and "
            "checkpoints are loaded as data. If you trust where it came from, load it with weights_only=False "
            "(AtomicCheckpointIO().load_checkpoint(path, weights_only=False))"
        )
    size = Path(path).stat().st_size if isinstance(path, (str, os.PathLike)) and Path(path).is_file() else 0
    return ConfigurationError(
        f"{path} is not a readable checkpoint ({size} bytes; {type(error).__name__}: "
        f"{str(error).strip().splitlines()[0] if str(error).strip() else 'empty'}); it may be truncated: use another one"
    )


#: What Lightning's instantiator for LightningCLI's hyper-parameters is called in a checkpoint.
CLI_INSTANTIATOR = f"{pl.__name__}.cli.instantiate_module"
#: Its name in either Lightning package (:mod:`adios_pl.backend`): a checkpoint written with one
#: loads with the other, which allows only its own name.
CLI_INSTANTIATORS = frozenset(f"{trainer}.cli.instantiate_module" for trainer, _ in PACKAGES.values())

_PLAIN = (bool, int, float, str, type(None))


def constructor_config(part: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuild ``part``, as LightningCLI writes a class in a
    config, or ``None``: for a class outside adios-pl (a user's class may not build from a config,
    or may live in a script), or where a constructor argument is not kept as an attribute of the
    same name with a plain value (a number, string, ``None`` or a list of those)."""
    cls = type(part)
    if not cls.__module__.startswith("adios_pl."):
        return None
    init_args: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(part, name, parameter.empty)
        if isinstance(value, (list, tuple)) and all(isinstance(item, _PLAIN) for item in value):
            value = list(value)
        elif not isinstance(value, _PLAIN):
            return None
        init_args[name] = value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def check_loadable(checkpoint: Any, hparams_file: Any, overrides: Mapping[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """The hyper-parameters a model will be built from (``load_from_checkpoint``'s arguments),
    refused where they name a class whose module is not imported, or where one of ``parts`` (the
    module-valued arguments) is neither saved nor in ``overrides``: a script passed it as a
    module, so the checkpoint holds its weights but not its arguments, and building the default
    would load those weights into another configuration."""
    saved = read_hyper_parameters(checkpoint, hparams_file, overrides.get("weights_only"))
    refuse_unimported_class_paths({key: value for key, value in saved.items() if key not in overrides}, checkpoint)
    missing = [name for name in parts if name not in saved and name not in overrides]
    if missing:
        raise ConfigurationError(
            f"{checkpoint} holds the weights of {', '.join(missing)} but not the arguments to build "
            f"{'them' if len(missing) > 1 else 'it'} (a script passed a module): pass the same again, "
            f"load_from_checkpoint(path, {', '.join(f'{name}=...' for name in missing)})"
        )
    return saved


def read_hyper_parameters(checkpoint: Any, hparams_file: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
    """The hyper-parameters ``load_from_checkpoint`` would build from: ``hparams_file``'s where
    given, else the checkpoint's (a local file is memory-mapped, so its tensors are not read)."""
    if hparams_file is not None:  # read as Lightning reads it: by its extension
        load = load_hparams_from_tags_csv if str(hparams_file).lower().endswith(".csv") else load_hparams_from_yaml
        return dict(load(hparams_file) or {})
    weights_only = True if weights_only is None else weights_only
    refuse_folder(checkpoint)
    try:
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(checkpoint):
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=weights_only, mmap=True)
        else:  # Lightning's own reader (a URL through torch.hub, which keeps the download; fsspec; a file object)
            position = checkpoint.tell() if hasattr(checkpoint, "seek") else None
            loaded = pl_load(checkpoint, map_location="cpu", weights_only=weights_only)
            if position is not None:  # rewound for Lightning's read
                checkpoint.seek(position)
    except UNREADABLE as error:
        raise unreadable_checkpoint(checkpoint, error) from error
    return dict(loaded.get("hyper_parameters") or {})


def refuse_unimported_class_paths(hyper_parameters: Mapping[str, Any], source: Any) -> None:
    """Raise ``ConfigurationError`` where ``hyper_parameters`` name a class (a ``class_path``,
    at any depth) whose module is not imported yet.

    Building a model from a LightningCLI checkpoint resolves each class path, and resolving one
    imports its module, which runs that module's code. Lightning refuses this for the model's own
    class; this refuses it for the parts nested in its arguments.
    """
    def class_paths(value: Any) -> list[str]:
        if isinstance(value, Mapping):
            own = [value[key] for key in ("class_path", "_class_path") if isinstance(value.get(key), str)]
            return own + [path for item in value.values() for path in class_paths(item)]
        if isinstance(value, (list, tuple)):
            return [path for item in value for path in class_paths(item)]
        return []

    for path in class_paths(hyper_parameters):
        module = path.rpartition(".")[0]
        if module and module not in sys.modules:
            raise ConfigurationError(
                f"{source} names the class {path!r}, whose module {module!r} is not imported; a checkpoint is data and "
                f"loading one never imports a module it names: if you trust it, run `import {module}` first"
            )


def _remove_stale_temporaries(target: Path) -> None:
    """Delete ``.NAME.tmpPID`` files beside ``target`` whose process is gone (killed mid-save)."""
    prefix = f".{target.name}.tmp"
    for leftover in target.parent.glob(prefix + "*"):
        pid = leftover.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass
