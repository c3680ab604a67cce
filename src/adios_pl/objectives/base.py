"""The small interface every SSL objective implements."""

from __future__ import annotations

from typing import Dict, Iterator, Sequence

import torch
from torch import Tensor, nn

#: What :meth:`Objective.forward` returns for one view: named tensors, ``"features"`` among them.
ViewOutput = Dict[str, Tensor]


class Objective(nn.Module):
    """An SSL objective: its heads (``projector``, and ``predictor`` where the method has one) and
    its loss between a clean view and a (possibly masked) view.

    :class:`~adios_pl.ADIOSModule` calls, in this order:

    1. ``build(encoder)`` once in its constructor: create the heads for ``encoder.num_features``
       (and, for momentum methods, the momentum copies).
    2. ``forward(encoder, images)`` per view and step: a dict of tensors for that view. Must hold
       ``"features"`` (the encoder output). Tensors that need gradients carry them; targets that
       must not (momentum branches, stop-gradients) are computed without them.
    3. ``loss(clean, masked)``: a scalar tensor; a mean over the batch. Objectives that mask both
       views (``mask_both_views``) implement ``loss_both`` instead. With
       ``masked_views="batched"`` the step calls ``terms_loss`` (the sum over the N masked terms)
       instead; its default adds up ``loss``/``loss_both``.
    4. ``on_encoder_step_end(encoder, step, total_steps)`` after each encoder optimiser step, and
       ``on_step_end(encoder, step, total_steps)`` after both players have stepped (``step``
       counts batches from 0). Momentum updates go in ``on_step_end``, as in the reference,
       so that the mask step sees the same targets as the encoder step.

    Parameters with ``requires_grad=True`` are trained by the encoder optimiser; momentum copies
    must set ``requires_grad=False``. The loss of one view pair must not depend on other pairs, so
    that ADIOS can back-propagate the N masked terms one at a time.

    With ``ADIOSModule(compile_objective=...)``, ``forward`` and the three losses run under
    ``torch.compile``, which traces them into graphs; code it cannot put in a graph (a print, a
    tensor's value read into Python) splits the graph there and runs eagerly, at the cost of the
    speed the option is for. Keep such work in the hooks of step 4, which are not compiled.
    """

    projector: nn.Module

    #: Whether both views are masked (each with masks predicted from itself) instead of only
    #: ``views[1]``; then :meth:`loss_both` gives the loss of one slot.
    mask_both_views: bool = False

    def build(self, encoder: nn.Module) -> None:
        """Create the heads for ``encoder`` (it has an integer ``num_features``)."""
        raise NotImplementedError

    def forward(self, encoder: nn.Module, images: Tensor) -> ViewOutput:  # pragma: no cover - abstract
        """Outputs of one view ``(B, 3, H, W)``; must contain ``"features"``."""
        raise NotImplementedError

    def loss(self, clean: ViewOutput, masked: ViewOutput) -> Tensor:  # pragma: no cover - abstract
        """Scalar loss between the clean view and the masked view."""
        raise NotImplementedError

    def loss_both(self, clean: Sequence[ViewOutput], masked: Sequence[ViewOutput]) -> Tensor:
        """Loss of one slot when both views are masked: ``clean`` and ``masked`` hold the outputs
        of ``views[0]`` and ``views[1]``, unmasked and masked. Only used when ``mask_both_views``."""
        raise NotImplementedError(f"{type(self).__name__} does not mask both views")

    def terms_loss(self, clean: Sequence[ViewOutput], terms: Sequence[Sequence[ViewOutput]]) -> Tensor:
        """The sum over masked terms of their losses: ``terms[n]`` holds term n's outputs, one per
        clean view (``loss(clean[0], terms[n][0])``, or ``loss_both`` when both views are masked).

        Called when all masked views went through the encoder together (``masked_views="batched"``),
        so that an objective can compute every term at once; this default adds the terms' losses.
        """
        if len(clean) == 2:
            return torch.stack([self.loss_both(clean, masked) for masked in terms]).sum()
        return torch.stack([self.loss(clean[0], masked[0]) for masked in terms]).sum()

    def on_encoder_step_end(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Hook after each encoder optimiser step; nothing by default."""

    def on_step_end(self, encoder: nn.Module, step: int, total_steps: int) -> None:
        """Hook after both players' steps of batch ``step``; nothing by default."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The head parameters the encoder optimiser updates (momentum copies excluded)."""
        return (p for p in self.parameters() if p.requires_grad)

    def constant_lr_parameters(self) -> list[nn.Parameter]:
        """Head parameters whose learning rate is held constant (not scheduled); none by default."""
        return []
