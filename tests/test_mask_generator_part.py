"""The mask generator is a part passed in: any module with num_masks whose masks sum to 1."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from adios_pl import ADIOSModule
from adios_pl.masks import MaskGenerator, RandomMasks

from conftest import make_loader, quiet_trainer

TINY = dict(encoder="small_cnn", encoder_kwargs={"width": 8}, image_size=16, warmup_epochs=0, lr=0.05, mask_lr=0.05)


class ConvMasks(nn.Module):
    """A one-layer learned mask generator: 1x1 conv and a softmax over slots."""

    def __init__(self, num_masks: int) -> None:
        super().__init__()
        self.num_masks = num_masks
        self.conv = nn.Conv2d(3, num_masks, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.conv(images).softmax(dim=1)


class Halves(nn.Module):
    """A fixed, parameter-free generator: left and right halves."""

    num_masks = 2

    def forward(self, images: Tensor) -> Tensor:
        left = torch.zeros_like(images[:, :1])
        left[..., : images.shape[-1] // 2] = 1
        return torch.cat([left, 1 - left], dim=1)


def test_a_learned_generator_passed_in_gets_the_mask_optimiser_and_step() -> None:
    generator = ConvMasks(3)
    before = [p.detach().clone() for p in generator.parameters()]
    model = ADIOSModule(**TINY, num_masks=3, mask_generator=generator)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, make_loader(n=16, size=16))
    assert model.mask_generator is generator and len(trainer.optimizers) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters())), "the generator was not trained"
    assert "train/mask_loss" in trainer.callback_metrics


def test_a_parameter_free_generator_gets_no_mask_step() -> None:
    model = ADIOSModule(**TINY, num_masks=2, mask_generator=Halves())
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, make_loader(n=16, size=16))
    assert len(trainer.optimizers) == 1 and "train/mask_loss" not in trainer.callback_metrics


def test_the_shorthand_builds_the_same_parts() -> None:
    assert isinstance(ADIOSModule(**TINY, num_masks=3, mask_width=8).mask_generator, MaskGenerator)
    assert isinstance(ADIOSModule(**TINY, num_masks=3, mask_type="random_block").mask_generator, RandomMasks)
    assert ADIOSModule(**TINY, num_masks=0).mask_generator is None


@pytest.mark.parametrize(("generator", "match"), [
    (ConvMasks(4), "num_masks=3 but mask_generator has num_masks=4"),
    (nn.Conv2d(3, 3, 1), "integer attribute num_masks"),
])
def test_a_wrong_generator_is_refused(generator: nn.Module, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ADIOSModule(**TINY, num_masks=3, mask_generator=generator)


def test_masks_that_do_not_sum_to_one_are_refused() -> None:
    class Ones(nn.Module):
        num_masks = 2

        def forward(self, images: Tensor) -> Tensor:
            return torch.ones(images.shape[0], 2, *images.shape[-2:])

    with pytest.raises(ValueError, match="sum to 1"):
        ADIOSModule(**TINY, num_masks=2, mask_generator=Ones())
