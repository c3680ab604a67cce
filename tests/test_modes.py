"""``eval_mode`` and the functions that run a module in eval mode: each submodule gets its own
mode back (a batch-norm layer frozen inside a training encoder stays frozen), also on errors."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from adios_pl.checks import check_mask_generator
from adios_pl.encoders import SmallConvNet, check_encoder
from adios_pl.evaluation import extract_features
from adios_pl.modes import eval_mode


def modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def frozen_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` in training mode with its first batch-norm layer in eval mode, as users freeze one."""
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    assert len(set(modes(model))) == 2
    return model


class TinyMaskGenerator(nn.Module):
    """A mask generator with batch norm (the default one has none) that can be told to fail."""

    def __init__(self, num_masks: int = 3, fail: bool = False) -> None:
        super().__init__()
        self.num_masks, self.fail = num_masks, fail
        self.conv = nn.Conv2d(3, num_masks, 1)
        self.norm = nn.BatchNorm2d(num_masks)

    def forward(self, images: Tensor) -> Tensor:
        if self.fail:
            raise RuntimeError("the mask generator failed")
        return self.norm(self.conv(images)).softmax(dim=1)


def test_eval_mode_puts_everything_in_eval_and_gives_each_submodule_its_own_mode_back() -> None:
    model = frozen_batch_norm(SmallConvNet(width=4))
    before = modes(model)
    with eval_mode(model) as inside:
        assert inside is model
        assert not any(modes(model))
    assert modes(model) == before


def test_eval_mode_gives_the_modes_back_when_the_block_raises() -> None:
    model = frozen_batch_norm(SmallConvNet(width=4))
    before = modes(model)
    with pytest.raises(KeyError, match="inside"):
        with eval_mode(model):
            raise KeyError("inside")
    assert modes(model) == before


def test_eval_mode_of_a_module_in_eval_mode_leaves_it_there() -> None:
    model = SmallConvNet(width=4).eval()
    with eval_mode(model):
        pass
    assert not any(modes(model))


def _extract(model: nn.Module) -> None:
    extract_features(model, DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)), batch_size=2))


@pytest.mark.parametrize("run", [_extract, lambda model: check_encoder(model, 16)], ids=["extract_features", "check_encoder"])
def test_encoder_users_run_it_in_eval_mode_and_keep_a_frozen_batch_norm_frozen(run: Callable[[nn.Module], None]) -> None:
    encoder = frozen_batch_norm(SmallConvNet(width=4))
    before = modes(encoder)
    seen: list[bool] = []
    encoder.register_forward_hook(lambda m, args, out: seen.append(any(modes(m))))
    run(encoder)
    assert seen and not any(seen), "the encoder ran with a submodule in training mode"
    assert modes(encoder) == before


def test_check_encoder_gives_the_modes_back_when_the_encoder_fails() -> None:
    encoder = frozen_batch_norm(SmallConvNet(width=4))
    before = modes(encoder)
    encoder.register_forward_pre_hook(lambda m, args: 1 / 0)
    with pytest.raises(ValueError, match="cannot take images of image_size=16: division by zero"):
        check_encoder(encoder, 16)
    assert modes(encoder) == before


@pytest.mark.parametrize("fail", [False, True])
def test_check_mask_generator_runs_it_in_eval_mode_and_gives_the_modes_back(fail: bool) -> None:
    generator = frozen_batch_norm(TinyMaskGenerator(fail=fail))
    before = modes(generator)
    seen: list[bool] = []
    generator.conv.register_forward_hook(lambda m, args, out: seen.append(any(modes(generator))))
    if fail:
        with pytest.raises(RuntimeError, match="the mask generator failed"):
            check_mask_generator(generator, 3, 8)
    else:
        check_mask_generator(generator, 3, 8)
        assert seen == [False]
    assert modes(generator) == before
