"""Make Lightning's ``global_step`` count batches under two optimisers (Lightning issue 17958).

Lightning counts every ``optimizer.step()`` of manual optimisation in ``global_step``, so the
two players' steps would count each batch twice, and ``max_steps``, schedules, tau and checkpoint
intervals would mean half as many batches. This is the only place that touches Lightning's private
step counting; it checks that what it touches exists.
"""

from __future__ import annotations

from typing import Any

from adios_pl.backend import pl

_HOOKS = ("_on_before_step", "_on_after_step")


def _no_op() -> None:
    return None


def _unsupported(what: str) -> RuntimeError:
    return RuntimeError(
        f"pytorch-lightning {pl.__version__} has no {what}; adios-pl needs it to count global_step in "
        "batches. Install a version adios-pl was tested with (constraints-lowest.txt and newer 2.x)."
    )


def count_batches_only(optimizers: list[Any]) -> None:
    """Only the first (encoder) optimiser's step advances ``global_step``: silence the others'
    step-counting hooks (``LightningOptimizer._on_before_step`` / ``_on_after_step``)."""
    for opt in optimizers[1:]:
        if not all(hasattr(opt, hook) for hook in _HOOKS):
            raise _unsupported("LightningOptimizer._on_before_step/_on_after_step")
        opt._on_before_step = _no_op
        opt._on_after_step = _no_op
