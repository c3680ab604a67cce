"""Run a module in eval mode for a while and hand it back exactly as it was.

Checks, feature extraction and offline evaluation run the encoder or the mask generator in
eval mode (batch norm uses and keeps its running statistics), then must give the module back
in the mode the caller left it in. ``module.train(was_training)`` is not enough for that: it
sets every submodule to the top module's mode, so a batch-norm layer a user froze in eval mode
inside a training encoder would start updating its statistics again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode inside the ``with`` block and yield it.

    On leaving the block, also when it raises, every submodule gets back its own mode from
    before the block (not the top module's), without calling overridden ``train`` methods.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
