"""The U-Net mask generator and the mask penalties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adios_pl.masking import masked_view, sample_slots
from adios_pl.masks import MaskGenerator, default_num_blocks
from adios_pl.penalties import entropy_term, mask_areas, sparsity_penalty


def reference_penalty(areas: torch.Tensor) -> torch.Tensor:
    """The reference's sparsity penalty, verbatim: ``1 / (sin(pi * a) + 1e-10)``."""
    return 1.0 / (torch.sin(math.pi * areas) + 1e-10)


@pytest.mark.parametrize("size", [32, 64, 96, 100, 128, 224])
def test_masks_shape_and_partition_of_unity(size: int) -> None:
    gen = MaskGenerator(num_masks=4, image_size=size, width=8)
    masks = gen(torch.randn(2, 3, size, size))
    assert masks.shape == (2, 4, size, size)
    assert torch.allclose(masks.sum(dim=1), torch.ones(2, size, size), atol=1e-5)
    assert (masks >= 0).all()


def test_block_count_follows_reference() -> None:
    assert [default_num_blocks(s) for s in (32, 64, 96, 128, 224)] == [4, 5, 5, 6, 6]


@pytest.mark.parametrize(
    ("size", "down", "up"),
    [
        (32, [(3, 1), (1, 2), (2, 2), (2, 2)], [(4, 2), (4, 2), (4, 1), (2, 1)]),
        (64, [(3, 1), (1, 1), (1, 2), (2, 2), (2, 2)], [(4, 2), (4, 2), (4, 1), (2, 1), (2, 1)]),
        (224, [(3, 1), (1, 1), (1, 1), (1, 2), (2, 2), (2, 2)], [(4, 2), (4, 2), (4, 1), (2, 1), (2, 1), (2, 1)]),
    ],
)
def test_layout_matches_reference(size: int, down: list, up: list) -> None:
    c = 16
    gen = MaskGenerator(num_masks=3, image_size=size, width=c)
    channels = lambda k: 3 if k == 3 else k * c  # noqa: E731 - "3" means RGB, k means k*c
    got_down = [(b[0].in_channels, b[0].out_channels) for b in gen.down]
    got_up = [(b[0].in_channels, b[0].out_channels) for b in gen.up]
    assert got_down == [(channels(i), channels(o)) for i, o in down]
    assert got_up == [(channels(i), channels(o)) for i, o in up]
    f = size // 2 ** (len(down) - 1)
    assert gen.bottleneck[1].in_features == 2 * c * f * f and gen.bottleneck[1].out_features == 128
    assert gen.head.out_channels == 3


def spec_mask_generator(gen: MaskGenerator, images: torch.Tensor, norm: str) -> torch.Tensor:
    """The U-Net of ADIOS.md ("The masking network") written out with functional operations on
    ``gen``'s weights: each block a 3x3 conv, its norm and a ReLU; nearest x0.5 (every other
    pixel) after each down block but the last, the skip taken before it; the bottleneck MLP; on
    the way up the upsampled features concatenated with their skip (in the reference's order:
    features first, ``src/utils/unet.py``), a block, nearest x2 (each pixel repeated) but after
    the last; a 1x1 conv and a softmax over the slots. For sizes divisible by 2**(blocks - 1)."""

    def block(layers: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        conv = layers[0]
        x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        if norm == "gn":
            x = F.group_norm(x, 8, layers[1].weight, layers[1].bias, layers[1].eps)
        elif norm == "in":
            x = F.instance_norm(x, weight=layers[1].weight, bias=layers[1].bias, eps=layers[1].eps)
        return F.relu(x)

    x, skips = images, []
    for i, layers in enumerate(gen.down):
        x = block(layers, x)
        skips.append(x)
        if i < len(gen.down) - 1:
            x = x[:, :, ::2, ::2]
    first, second, third = [m for m in gen.bottleneck if isinstance(m, torch.nn.Linear)]
    h = F.relu(F.linear(x.flatten(1), first.weight, first.bias))
    h = F.relu(F.linear(h, second.weight, second.bias))
    x = F.relu(F.linear(h, third.weight, third.bias)).view(x.shape)
    for i, layers in enumerate(gen.up):
        x = block(layers, torch.cat([x, skips[-1 - i]], dim=1))
        if i < len(gen.up) - 1:
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return F.conv2d(x, gen.head.weight, gen.head.bias).softmax(dim=1)


@pytest.mark.parametrize(("size", "norm"), [(32, "gn"), (32, "in"), (32, "none"), (64, "gn"), (128, "in")])
def test_mask_generator_equals_the_spec_written_out(size: int, norm: str) -> None:
    torch.manual_seed(0)
    gen = MaskGenerator(num_masks=3, image_size=size, width=8, norm=norm).double()
    for p in gen.parameters():  # away from the initial values (norm weights 1, biases 0)
        p.data.add_(0.1 * torch.randn_like(p))
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert torch.allclose(gen(images), spec_mask_generator(gen, images, norm), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["gn", "in", "none"])
def test_norms(norm: str) -> None:
    gen = MaskGenerator(num_masks=2, image_size=32, width=8, norm=norm)
    assert gen(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    assert (gen.down[0][0].bias is not None) == (norm == "none")


def test_wrong_input_size_is_a_clear_error() -> None:
    gen = MaskGenerator(num_masks=2, image_size=32, width=8)
    with pytest.raises(ValueError, match="image_size"):
        gen(torch.randn(1, 3, 64, 64))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_norm"):
        MaskGenerator(2, 32, norm="bn")
    with pytest.raises(ValueError, match="mask_width"):
        MaskGenerator(2, 32, width=12, norm="gn")
    with pytest.raises(ValueError, match="num_masks"):
        MaskGenerator(1, 32)


def test_sparsity_penalty_equals_reference_where_well_defined() -> None:
    areas = torch.tensor([[0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]], dtype=torch.float64)
    assert torch.allclose(sparsity_penalty(areas), reference_penalty(areas), rtol=1e-12)
    assert torch.allclose(sparsity_penalty(torch.tensor([0.5])), torch.tensor([1.0]))


def test_sparsity_penalty_is_large_positive_and_finite_at_saturation() -> None:
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor([0.0, 1.0, 1.0 + 1e-7, -1e-7], dtype=dtype, requires_grad=True)
        value = sparsity_penalty(a)
        assert torch.isfinite(value).all() and (value > 1e9).all()
        value.sum().backward()
        assert torch.isfinite(a.grad).all()
    # the reference formula goes hugely negative at area 1 in float32: what this form avoids
    assert reference_penalty(torch.tensor([1.0])).item() < 0


def test_entropy_term_equals_naive_sum() -> None:
    areas = torch.rand(5, 4, dtype=torch.float64)
    naive = 0.0
    for b in range(5):
        z = sum(math.exp(areas[b, n]) for n in range(4))
        for n in range(4):
            p = math.exp(areas[b, n]) / z
            naive += p * math.log(p)
    assert math.isclose(entropy_term(areas).item(), naive, rel_tol=1e-12)


def test_masked_view_and_slots() -> None:
    x = torch.randn(5, 3, 8, 8)
    m = torch.rand(5, 3, 8, 8).softmax(dim=1)
    assert torch.equal(masked_view(x, m, 1), x * (1 - m[:, 1:2]))
    slots = sample_slots(5, 3, torch.Generator().manual_seed(0))
    got = masked_view(x, m, slots)
    for b in range(5):
        assert torch.equal(got[b], x[b] * (1 - m[b, int(slots[b])]))
    assert mask_areas(m).shape == (5, 3)


def test_slots_are_uniform_and_any_batch_size() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_slots(60000, 6, g), minlength=6).float()
    assert (counts / 60000 - 1 / 6).abs().max() < 0.01
    assert sample_slots(3, 6, g).shape == (3,)


def test_saturated_masks_give_finite_gradients() -> None:
    gen = MaskGenerator(num_masks=3, image_size=32, width=8)
    with torch.no_grad():
        gen.head.bias.copy_(torch.tensor([80.0, -80.0, -80.0]))  # slot 0 covers everything
    masks = gen(torch.randn(2, 3, 32, 32))
    loss = sparsity_penalty(mask_areas(masks)).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["random_patch", "random_block"])
def test_random_masks_partition_with_balanced_slots_and_a_reproducible_generator(kind: str) -> None:
    from adios_pl.masks import RandomMasks

    masks = RandomMasks(6, 32, kind=kind, patch_size=4)
    masks.generator = torch.Generator().manual_seed(0)
    first = masks(torch.zeros(64, 3, 32, 32))
    assert first.shape == (64, 6, 32, 32) and torch.equal(first.sum(1), torch.ones(64, 32, 32))
    cells = first[:, :, ::4, ::4].sum((2, 3))  # cells per slot and image, of 64
    if kind == "random_patch":  # cells dealt evenly: 64 // 6 or one more
        assert cells.min() >= 10 and cells.max() <= 11
    else:  # blocks: slots 1..N-1 exactly 64 // 6 cells, the last the rest
        assert (cells[:, :5] == 10).all() and (cells[:, 5] == 14).all()
    masks.generator = torch.Generator().manual_seed(0)
    assert torch.equal(masks(torch.zeros(64, 3, 32, 32)), first), "the module's generator does not drive the draws"
    assert not torch.equal(masks(torch.zeros(64, 3, 32, 32)), first)


def test_random_blocks_are_compact() -> None:
    """Blocks grow from rectangles: a slot's cells touch each other far more than dealt cells do."""
    from adios_pl.masks import RandomMasks

    def touching(kind: str) -> float:
        m = RandomMasks(4, 64, kind=kind, patch_size=4)
        m.generator = torch.Generator().manual_seed(1)
        slots = m(torch.zeros(128, 3, 64, 64))[:, :, ::4, ::4].argmax(1)  # (B, 16, 16) slot per cell
        return float((slots[:, :, 1:] == slots[:, :, :-1]).float().mean())

    assert touching("random_block") > 0.6 > 0.4 > touching("random_patch")


def test_random_blocks_equal_the_algorithm_written_out_per_image() -> None:
    """The batched ``random_block`` draw against its algorithm, image by image and cell by cell,
    from the same random numbers (drawn in the module's order: per slot and attempt, area,
    aspect, top and left for every image; per slot, the fill order of the cells left)."""
    import math

    from adios_pl.masks import BLOCK_ATTEMPTS, RandomMasks

    batch, n, g = 6, 4, 8
    masks = RandomMasks(n, 32, kind="random_block", patch_size=4)  # 8 x 8 cells
    masks.generator = torch.Generator().manual_seed(3)
    got = masks(torch.zeros(batch, 3, 32, 32))[:, :, ::4, ::4].argmax(1)  # (B, g, g) slot per cell

    rng = torch.Generator().manual_seed(3)
    draws = []
    for _ in range(n - 1):
        attempts = [[torch.rand(*shape, generator=rng).flatten() for shape in ((batch,), (batch,), (batch, 1, 1), (batch, 1, 1))]
                    for _ in range(BLOCK_ATTEMPTS)]
        draws.append((attempts, torch.rand(batch, g * g, generator=rng)))
    target = g * g // n
    low, high = math.log(0.3), math.log(1 / 0.3)
    for b in range(batch):
        slot_of = [[n - 1] * g for _ in range(g)]  # the last slot takes what is left
        free = [[True] * g for _ in range(g)]
        for slot, (attempts, fill) in enumerate(draws):
            count = 0
            for u_area, u_aspect, u_top, u_left in attempts:
                remaining = max(target - count, 0)
                area = 1 + u_area[b] * (max(remaining, 1) - 1)
                aspect = torch.exp(low + u_aspect[b] * (high - low))
                h = int(torch.round(torch.sqrt(area * aspect)).clamp(1, g))
                w = int(torch.round(torch.sqrt(area / aspect)).clamp(1, g))
                top, left = int(torch.floor(u_top[b] * (g - h + 1))), int(torch.floor(u_left[b] * (g - w + 1)))
                taken = 0
                for r in range(top, top + h):  # the rectangle's free cells in raster order, up to the quota
                    for c in range(left, left + w):
                        if free[r][c] and taken < remaining:
                            free[r][c], slot_of[r][c], taken = False, slot, taken + 1
                count += taken
            cells_left = sorted((float(fill[b, r * g + c]), r, c) for r in range(g) for c in range(g) if free[r][c])
            for _, r, c in cells_left[: max(target - count, 0)]:  # short of the quota: random free cells
                free[r][c], slot_of[r][c] = False, slot
        assert got[b].tolist() == slot_of, f"image {b}"
