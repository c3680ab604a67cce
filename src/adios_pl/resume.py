"""Resuming from a checkpoint: what it must agree with, and the configured rates that win.

- :func:`check_identity`: a checkpoint of another configuration (objective, encoder, N, image
  size, mask generator, optimiser) is refused with one message naming each mismatch.
- :func:`apply_configured_rates`: the configured ``lr``, ``mask_lr``, weight decay and momentum
  replace the saved ones, so a changed configuration takes effect on resume.
"""

from __future__ import annotations

from typing import Any

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
