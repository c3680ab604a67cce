"""Resuming from a checkpoint: what it must agree with, and the configured rates that win.

- :func:`check_identity`: a checkpoint of another configuration (objective, encoder, N, image
  size, mask generator, optimiser) is refused with one message naming each mismatch.
- :func:`apply_configured_rates`: the configured ``lr``, ``mask_lr``, weight decay and momentum
  replace the saved ones, so a changed configuration takes effect on resume.
- :func:`find_last_checkpoint`: what ``--ckpt_path last`` resumes from, across the logger's
  versions (Lightning looks in the new run's own, still empty, version folder only).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

from adios_pl.backend import ModelCheckpoint, get_filesystem, pl
from adios_pl.errors import ConfigurationError


def check_identity(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise ``ConfigurationError`` where ``saved`` (a checkpoint's identity) and ``identity``
    (the model's) disagree on a key both have."""
    mismatches = [
        f"{key}: checkpoint {saved[key]!r}, this model {value!r}"
        for key, value in identity.items()
        if key in saved and saved[key] != value
    ]
    if mismatches:
        raise ConfigurationError(
            "the checkpoint was trained with another configuration (" + "; ".join(mismatches)
            + "); load it into a model built with the same settings"
        )


def apply_configured_rates(
    checkpoint: dict[str, Any], lr: float, mask_lr: float, weight_decay: float, momentum: float, optimizer: str,
) -> None:
    """Make the configured rates win over the checkpoint's, in place.

    Each optimiser's rates (the encoder side's first, then the mask generator's) are rescaled by
    ``configured / saved`` base rate, so an unchanged configuration resumes exactly and a
    changed one continues the schedule at the new rate.
    """
    states = zip(checkpoint.get("optimizer_states", []), checkpoint.get("lr_schedulers", []))
    for index, (opt_state, sched_state) in enumerate(states):
        base = lr if index == 0 else mask_lr
        saved = list(sched_state.get("base_lrs", []))
        sched_state["base_lrs"] = [base] * len(saved)
        for group, old in zip(opt_state.get("param_groups", []), saved):
            group["lr"] = group["lr"] * (base / old if old else 1.0)
            if "initial_lr" in group:
                group["initial_lr"] = base
            group["weight_decay"] = weight_decay
            if "momentum" in group and optimizer != "adamw":
                group["momentum"] = momentum
        if "_last_lr" in sched_state:
            sched_state["_last_lr"] = [g["lr"] for g in opt_state.get("param_groups", [])]


def last_checkpoint_patterns(trainer: pl.Trainer) -> list[str]:
    """Where :func:`find_last_checkpoint` looks, as glob patterns of files.

    ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` (``last-v1.ckpt``, ... beside an
    older one) into its ``dirpath`` if given; otherwise into
    ``<save_dir>/<name>/<version>/checkpoints`` of the first logger, a new version each run, so
    every version's folder is searched; without a logger into ``<default_root_dir>/checkpoints``.
    Lightning resolves these folders only once training starts; this is the same rule, read
    before. Lightning's SLURM requeue writes ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` when the job
    is signalled; those are candidates too.
    """
    folders: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            folders.append(str(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            folders.append(os.path.join(str(save_dir), str(logger.name), "*", "checkpoints"))
        else:
            folders.append(os.path.join(str(trainer.default_root_dir), "checkpoints"))
    patterns = [f"{folder.rstrip('/')}/last*.ckpt" for folder in folders]
    patterns.append(os.path.join(str(trainer.default_root_dir), "hpc_ckpt_*.ckpt"))
    return list(dict.fromkeys(patterns))


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The most recently written checkpoint of :func:`last_checkpoint_patterns` (the
    ``last.ckpt`` of ``ModelCheckpoint(save_last=True)`` in any earlier run's folder, or a SLURM
    requeue checkpoint), or ``None`` when there is none.

    This is what ``adios-pl fit --ckpt_path last`` resumes from. Lightning's own ``"last"``
    looks only in the folder of the run being started, which with a logger is a new, empty
    version folder, so a second run started the same way trains from scratch. Call it before
    ``fit`` in a script that is restarted after preemption::

        trainer.fit(model, datamodule, ckpt_path=find_last_checkpoint(trainer))

    Every version of the logger's folder is searched: give each experiment its own
    ``default_root_dir`` (or logger name), or the newest run of another experiment is found.
    """
    return newest_checkpoint(last_checkpoint_patterns(trainer))


def newest_checkpoint(patterns: Sequence[str]) -> str | None:
    """The most recently modified file matching any of the glob ``patterns`` (local or remote),
    the one with the higher numbers in its path where two have the same time, or ``None``. Temporaries of a save in progress (``.last.ckpt.tmpPID``) match no ``last*``
    pattern."""
    candidates: dict[str, float] = {}
    for pattern in patterns:
        fs = get_filesystem(pattern)
        for path in fs.glob(pattern):
            name = fs.unstrip_protocol(path) if "://" in pattern else str(path)  # s3://... stays remote
            candidates[name] = float(fs.modified(path).timestamp())
    if not candidates:
        return None
    # equal times (a file system that keeps whole seconds): the later version, version_10 after version_9
    return max(candidates, key=lambda name: (candidates[name], [int(part) if part.isdigit() else part
                                                                for part in re.split(r"(\d+)", name)]))
