"""The device augmentation against the CPU pipeline: each colour op against torchvision's, and
the statistics of the random draws (crop areas and ratios, flip rate, jitter, grayscale, blur,
solarisation) of both pipelines on the same images, compared with two-sample KS tests."""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from adios_pl.data import ShapesDataModule
from adios_pl.data.base import CachedImages, SSLDataModule
from adios_pl.data.device_augment import (
    DRAW_COLUMNS,
    DRAWS_PER_IMAGE,
    DeviceAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    sample_crops,
)
from adios_pl.data.transforms import pretrain_transform

N = 2000  # draws per pipeline
# KS critical value at alpha = 0.001 for two samples of N
KS_LIMIT = 1.949 * math.sqrt(2 / N)
NO_COLOUR = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0, solarization_prob=0.0)
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def ks(a: torch.Tensor, b: torch.Tensor, shift: float = 0.0) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, up to a shift: the largest amount by which one
    empirical CDF exceeds the other's moved by ``shift`` (0: the plain KS statistic).

    The CPU pipeline rounds to uint8 after every colour op (truncating), the device one does
    not; statistics that an op hardly moves (the mean luma under a contrast change) then differ
    by a quantisation offset that a plain KS test, blind to scale, would flag. ``shift`` allows
    that offset and nothing more.
    """
    grid = torch.cat([a, b]).sort().values
    a, b = a.sort().values, b.sort().values
    cdf = lambda x, at: torch.searchsorted(x, at, right=True) / len(x)  # noqa: E731
    return float(torch.maximum(cdf(a, grid) - cdf(b, grid + shift), cdf(b, grid) - cdf(a, grid + shift)).max())


# One uint8 step. Measured on the colour statistics below with the right parameters: KS 0.21
# with no shift (the rounding offset alone), 0.021 with this one.
QUANTISATION = 1 / 255


def both_pipelines(image: torch.Tensor, size: int, **kw: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` views of uint8 ``image`` from the CPU pipeline and ``N`` from the device one, in [0, 1]."""
    torch.manual_seed(0)
    cpu_view = pretrain_transform(size, **PLAIN, **kw)  # type: ignore[arg-type]
    cpu = torch.stack([cpu_view(image) for _ in range(N)])
    device = DeviceAugmentation(size, **PLAIN, **kw, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    return cpu, device.augment(image.expand(N, -1, -1, -1))


def test_both_pipelines_take_the_same_settings_with_the_same_defaults() -> None:
    """DeviceAugmentation repeats pretrain_transform's signature (a module and a function): the
    shared arguments must not drift apart."""
    import inspect

    cpu = inspect.signature(pretrain_transform).parameters
    device = inspect.signature(DeviceAugmentation.__init__).parameters
    assert set(cpu) <= set(device), f"missing on the device: {set(cpu) - set(device)}"
    for name, parameter in cpu.items():
        assert device[name].default == parameter.default, f"{name}: {device[name].default} vs {parameter.default}"


def test_both_pipelines_normalise_with_the_given_mean_and_std() -> None:
    """With every random op off and the whole image kept (scale 1), a view of either pipeline is
    ``(image / 255 - mean) / std``."""
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = (image / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    settings = dict(mean=mean, std=std, min_scale=1.0, **NO_COLOUR)
    cpu = pretrain_transform(16, **settings)(image)  # type: ignore[arg-type]
    device = DeviceAugmentation(16, **settings).augment(image[None])[0]  # type: ignore[arg-type]
    # float32 rounding of the scaling and normalisation (values up to 5): observed 7e-7 on the CPU
    # pipeline, 0 on the device one (its bicubic weights at the pixel centres are 0, 1, 0, 0)
    torch.testing.assert_close(cpu, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(device, expected, atol=1e-5, rtol=0)

@pytest.mark.parametrize("name,ours,theirs", [
    ("brightness", adjust_brightness, TF.adjust_brightness),
    ("contrast", adjust_contrast, TF.adjust_contrast),
    ("saturation", adjust_saturation, TF.adjust_saturation),
])
def test_jitter_ops_match_torchvision(name: str, ours, theirs) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.5, 1.8]).view(6, 1, 1, 1)
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(6)])
    # float32 ops of a few roundings each: observed <= 1.2e-7
    torch.testing.assert_close(ours(x, factors), expected, atol=1e-6, rtol=0)


def test_hue_and_blur_match_torchvision() -> None:
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    shifts = torch.tensor([-0.2, -0.05, 0.0, 0.1, 0.2])
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(5)])
    # HSV round trip in float32: observed 1e-6
    torch.testing.assert_close(adjust_hue(x, shifts.view(5, 1, 1, 1)), expected, atol=1e-5, rtol=0)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(s)] * 2) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(gaussian_blur(x, 5, sigmas), expected, atol=1e-6, rtol=0)


def test_crop_sampling_follows_torchvision_rules() -> None:
    boxes = sample_crops(5000, 48, 64, (0.08, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 48).all() and (left + w <= 64).all(), "a crop leaves the image"
    assert (boxes == boxes.round()).all(), "crop boxes must be whole pixels"
    # an impossible scale range falls back to the centre crop, ratio clamped: a 10x40 image is wider
    # than 4/3, so the crop is 10 x round(10 * 4/3) = 13, centred at left (40 - 13) // 2 = 13
    fallback = sample_crops(10, 10, 40, (2.0, 3.0), (3 / 4, 4 / 3), torch.device("cpu"))
    assert fallback[:, 2].eq(10).all() and fallback[:, 3].eq(13).all() and fallback[:, 1].eq(13).all()


def test_crop_area_ratio_and_flip_statistics_match_the_cpu_pipeline() -> None:
    # R encodes x and G encodes y, so a view's ramps tell its crop's width, height and flip
    height, width, size = 48, 64, 32
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([(xs + 0.5) / width, (ys + 0.5) / height, torch.full_like(xs, 0.5, dtype=torch.float)])
    image = (image * 255).round().to(torch.uint8)
    cpu, dev = both_pipelines(image, size, min_scale=0.08, **{**NO_COLOUR, "flip_prob": 0.5})

    def geometry(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # slopes between pixels 2 and size-3, away from the edges the two resamplers treat differently
        dx = (views[:, 0, :, size - 3] - views[:, 0, :, 2]).mean(1) / (size - 5) * size * width
        dy = (views[:, 1, size - 3, :] - views[:, 1, 2, :]).mean(1) / (size - 5) * size * height
        return dx.abs() * dy.abs() / (height * width), torch.log(dx.abs() / dy.abs()), (dx < 0).float()

    (area_c, ratio_c, flip_c), (area_d, ratio_d, flip_d) = geometry(cpu), geometry(dev)
    assert ks(area_c, area_d) < KS_LIMIT, f"crop areas differ: KS {ks(area_c, area_d):.3f}"
    assert ks(ratio_c, ratio_d) < KS_LIMIT, f"crop aspect ratios differ: KS {ks(ratio_c, ratio_d):.3f}"
    assert 0.07 < float(area_d.min()) and float(area_d.max()) < 1.02
    assert abs(float(flip_d.mean()) - 0.5) < 4 * math.sqrt(0.25 / N) and abs(float(flip_c.mean()) - 0.5) < 4 * math.sqrt(0.25 / N)


def _colourful(size: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(6 * xs), 0.5 + 0.4 * torch.cos(5 * ys), 0.3 + 0.5 * xs * ys])
    return (image * 255).round().to(torch.uint8)


def _colour_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    luma = 0.2989 * views[:, 0] + 0.587 * views[:, 1] + 0.114 * views[:, 2]
    return {
        "brightness": luma.mean((1, 2)),
        "contrast": luma.std((1, 2)),
        "saturation": (views.amax(1) - views.amin(1)).mean((1, 2)),
        "red-green": (views[:, 0] - views[:, 1]).mean((1, 2)),
        "green-blue": (views[:, 1] - views[:, 2]).mean((1, 2)),
    }


def _jitter_gaps(**device_kw: float) -> dict[str, float]:
    """KS statistics between the CPU pipeline's jittered views and the device one's (with
    ``device_kw`` overriding the device pipeline's settings)."""
    kw = {**NO_COLOUR, "jitter_prob": 0.8}
    device = DeviceAugmentation(24, **PLAIN, min_scale=1.0, **{**kw, **device_kw}, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    ours = _colour_statistics(device.augment(_colourful(24).expand(N, -1, -1, -1)))
    return {name: ks(c, ours[name], QUANTISATION) for name, c in _cpu_jitter_statistics().items()}


def _jitter_one_position_at_a_time(aug: DeviceAugmentation, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The obvious colour jitter: image by image, its four ops one after another in the order its
    draws give, each at the image's own factor. Parameters from ``draws`` as documented in
    ``DeviceAugmentation.jitter_parameters``: uniform in [1 - s, 1 + s] and [-h, h], and the
    order of the four "order" columns."""
    n = x.shape[0]
    u = draws[:, DRAW_COLUMNS["factors"]].tolist()
    hue = draws[:, DRAW_COLUMNS["hue"]].flatten().tolist()
    order = draws[:, DRAW_COLUMNS["order"]].tolist()
    strengths = [aug.jitter[k] for k in ("brightness", "contrast", "saturation", "hue")]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    images = []
    for i in range(n):
        factors = [1 - s + 2 * s * u[i][k] for k, s in enumerate(strengths[:3])] + [2 * strengths[3] * hue[i] - strengths[3]]
        image = x[i : i + 1]
        for op in sorted(range(4), key=lambda k: order[i][k]):  # the ops by their draws, smallest first
            image = ops[op](image, torch.tensor(factors[op]).view(1, 1, 1, 1))
        images.append(image[0])
    return torch.stack(images)


def test_colour_jitter_equals_one_position_at_a_time() -> None:
    """The jitter applies the hue once, between positions where brightness, contrast and
    saturation act at factor 1 on the images whose op is elsewhere; the result is the same."""
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = DeviceAugmentation(8, **PLAIN, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    draws = aug.draw(x.shape[0])
    expected = _jitter_one_position_at_a_time(aug, x, draws)
    # the same float ops on each image, and exact identities elsewhere. The factors are computed
    # in float64 here and in float32 there, and one float32 rounding of a factor moves the result
    # by up to 1.3e-6 (measured); a wrong order or factor range moves it by more than 1e-2
    torch.testing.assert_close(aug._color_jitter(x, draws), expected, atol=5e-6, rtol=0)
    assert (expected - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "some image was not jittered"


@functools.lru_cache(maxsize=1)
def _cpu_jitter_statistics() -> dict[str, torch.Tensor]:
    cpu, _ = both_pipelines(_colourful(24), 24, min_scale=1.0, **{**NO_COLOUR, "jitter_prob": 0.8})
    return _colour_statistics(cpu)


def test_colour_jitter_statistics_match_the_cpu_pipeline() -> None:
    gaps = _jitter_gaps()
    assert max(gaps.values()) < KS_LIMIT, f"colour jitter statistics differ: {gaps}"


@pytest.mark.parametrize("wrong", [{"hue": 0.1}, {"contrast": 0.4}, {"brightness": 0.4}, {"jitter_prob": 0.6}])
def test_the_colour_check_detects_a_wrong_setting(wrong: dict[str, float]) -> None:
    gaps = _jitter_gaps(**wrong)
    assert max(gaps.values()) > KS_LIMIT, f"{wrong} went unnoticed: {gaps}"


def test_grayscale_solarisation_and_blur_rates_match_the_cpu_pipeline() -> None:
    image = _colourful(24)
    image[:, ::2, ::2] = 255  # fine detail the blur removes
    kw = {**NO_COLOUR, "grayscale_prob": 0.2, "solarization_prob": 0.3, "blur_prob": 0.5}
    cpu, dev = both_pipelines(image, 24, min_scale=1.0, **kw)
    for views in (cpu, dev):
        gray = (views[:, 0] - views[:, 1]).abs().amax((1, 2)) < 1e-3
        assert abs(float(gray.float().mean()) - 0.2) < 4 * math.sqrt(0.16 / N)
    def detail(v: torch.Tensor) -> torch.Tensor:
        return (v[:, :, 1:] - v[:, :, :-1]).abs().mean((1, 2, 3))

    blur_gap = ks(detail(cpu), detail(dev), QUANTISATION)
    assert blur_gap < KS_LIMIT, f"blur strength differs: KS {blur_gap:.3f}"
    # solarised views lose the white dots
    solarise_gap = ks(cpu.amax((1, 2, 3)), dev.amax((1, 2, 3)), QUANTISATION)
    assert solarise_gap < KS_LIMIT, f"solarisation differs: KS {solarise_gap:.3f}"


def test_the_statistics_test_detects_a_wrong_scale_range() -> None:
    """The KS check has teeth: a device pipeline with min_scale 0.2 instead of 0.08 fails it."""
    height, width = 48, 64
    boxes_right = sample_crops(N, height, width, (0.08, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), torch.Generator().manual_seed(0))
    boxes_wrong = sample_crops(N, height, width, (0.2, 1.0), (3 / 4, 4 / 3), torch.device("cpu"), torch.Generator().manual_seed(0))
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    assert ks(area(boxes_right), area(boxes_wrong)) > KS_LIMIT


#: Every augmentation setting at a value of its own and none at its default, so that a setting
#: which never reaches a pipeline, or reaches it in another's place, changes what it builds.
DISTINCT = dict(min_scale=0.3, brightness=0.2, contrast=0.7, saturation=0.4, hue=0.1, jitter_prob=0.6,
                grayscale_prob=0.15, blur_prob=0.35, flip_prob=0.3, solarization_prob=0.45)


def _cpu_steps(dm: SSLDataModule) -> dict[str, T.Transform]:
    """The steps of the DataModule's CPU view transform by the name of what they apply."""
    steps = dm.train_transform().transform.transforms  # type: ignore[attr-defined]
    return {type(s.transforms[0] if isinstance(s, T.RandomApply) else s).__name__: s for s in steps}


def test_a_datamodules_settings_reach_the_cpu_pipeline() -> None:
    """The statistical comparisons above run both pipelines at the defaults, where a setting that
    is ignored (or swapped with another of the same default) goes unseen."""
    steps = _cpu_steps(SSLDataModule(image_size=24, **PLAIN, **DISTINCT))  # type: ignore[arg-type]
    assert steps["RandomResizedCrop"].scale == (0.3, 1.0)
    rates = {name: steps[name].p for name in ("ColorJitter", "RandomGrayscale", "GaussianBlur", "RandomSolarize", "RandomHorizontalFlip")}
    assert rates == {"ColorJitter": 0.6, "RandomGrayscale": 0.15, "GaussianBlur": 0.35, "RandomSolarize": 0.45, "RandomHorizontalFlip": 0.3}
    jitter = steps["ColorJitter"].transforms[0]
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    assert ranges == [pytest.approx(r) for r in [(0.8, 1.2), (0.3, 1.7), (0.6, 1.4), (-0.1, 0.1)]], ranges


def test_a_datamodules_settings_reach_the_device_pipeline() -> None:
    """Each op of the device pipeline applies exactly when its draw is below its own setting (the
    draws just below and just above each probability), the jitter's factors span the CPU
    ColorJitter's ranges, and its blur is the CPU pipeline's GaussianBlur, kernel and all."""
    dm = SSLDataModule(image_size=24, **PLAIN, **DISTINCT)  # type: ignore[arg-type]
    aug, cpu = dm.device_augmentation(), _cpu_steps(dm)
    image = _colourful(24)
    image[:, ::2, ::2] = 255  # detail for the blur, bright pixels for the solarisation
    off = torch.full((1, DRAWS_PER_IMAGE), 0.999)  # every op off
    off[:, DRAW_COLUMNS["aspect"]] = 0.5  # crops of ratio 1 and area 0.9993: the whole image
    off[:, DRAW_COLUMNS["factors"]], off[:, DRAW_COLUMNS["hue"]], off[:, DRAW_COLUMNS["sigma"]] = 0.1, 0.1, 0.5

    def view(column: str, u: float) -> torch.Tensor:
        draws = off.clone()
        draws[:, DRAW_COLUMNS[column]] = u
        return aug.transform(image[None], draws)

    probabilities = {"jitter": 0.6, "grayscale": 0.15, "blur": 0.35, "solarize": 0.45, "flip": 0.3}
    for column, p in probabilities.items():
        below, above = view(column, p - 0.01), view(column, p + 0.01)
        assert torch.equal(below, view(column, 0.0)), f"{column}: not applied at a draw just below {p}"
        assert torch.equal(above, view(column, 0.999)), f"{column}: applied at a draw just above {p}"
        assert not torch.allclose(below, above), f"{column}: the op changed nothing"
    (low, low_hue, _), (high, high_hue, _) = (aug.jitter_parameters(torch.full((1, DRAWS_PER_IMAGE), u)) for u in (0.0, 1.0))
    device_ranges = [(float(low[0, k]), float(high[0, k])) for k in range(3)] + [(float(low_hue), float(high_hue))]  # type: ignore[arg-type]
    jitter = cpu["ColorJitter"].transforms[0]
    assert device_ranges == [pytest.approx(r) for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)]
    blur = cpu["GaussianBlur"].transforms[0]
    sigma = float(torch.tensor(0.5) * 1.9 + 0.1)  # the sigma draw 0.5 in [0.1, 2.0)
    expected = TF.gaussian_blur(view("blur", 0.999)[0], list(blur.kernel_size), [sigma, sigma])
    # the same taps in float32: measured 2.4e-7 apart; with a kernel of 5 instead of 3, 0.07
    torch.testing.assert_close(view("blur", 0.0)[0], expected, atol=1e-5, rtol=0)


def test_device_mode_datamodule_ships_uint8_and_makes_two_normalised_views() -> None:
    dm = ShapesDataModule(train_size=64, val_size=16, batch_size=16, num_workers=0, augment_on="device")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, CachedImages), "Shapes fits in memory: it is decoded once"
    images, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32) and targets.shape == (16,)
    cached = loader.dataset.images
    assert torch.equal(cached[3], dm.pretrain_set[3][0]), "the cache holds the images unchanged"  # type: ignore[index]

    class Training:  # what on_after_batch_transfer reads of the trainer
        training = True
        global_rank = 0

    dm.trainer = Training()  # type: ignore[assignment]
    (v1, v2), same_targets = dm.on_after_batch_transfer((images, targets), 0)
    assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32 and same_targets is targets
    assert not torch.allclose(v1, v2), "the two views must be independent draws"
    assert abs(float(torch.cat([v1, v2]).mean())) < 1.5, "the views are normalised"
    Training.training = False
    assert dm.on_after_batch_transfer((images, targets), 0)[0] is images, "evaluation batches pass unchanged"


def test_cache_follows_the_setting() -> None:
    dm = ShapesDataModule(train_size=32, val_size=16, batch_size=8, num_workers=0, augment_on="device", cache_images=False)
    dm.setup("fit")
    assert not isinstance(dm.train_dataloader().dataset, CachedImages)
    with pytest.raises(ValueError, match="augment_on"):
        ShapesDataModule(augment_on="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stored_size"):
        ShapesDataModule(augment_on="device", stored_size=4)


def test_stored_size_is_the_side_of_the_stored_images_and_the_views_keep_image_size() -> None:
    dm = ShapesDataModule(train_size=32, val_size=16, batch_size=8, num_workers=0, augment_on="device", stored_size=48)
    dm.setup("fit")
    cached = dm.train_dataloader().dataset
    assert isinstance(cached, CachedImages) and cached.images.shape == (32, 3, 48, 48)
    dm.trainer = type("T", (), {"training": True, "global_rank": 0})()  # type: ignore[assignment]
    (v1, v2), _ = dm.on_after_batch_transfer((cached.images[:8], cached.targets[:8]), 0)
    assert v1.shape == v2.shape == (8, 3, 32, 32)
    undecoded = ShapesDataModule(train_size=32, val_size=16, batch_size=8, num_workers=0, augment_on="device", stored_size=40, cache_images=False)
    undecoded.setup("fit")
    assert undecoded.train_dataloader().dataset[0][0].shape == (3, 40, 40)


def test_each_rank_draws_its_own_augmentation() -> None:
    """Ranks seeded alike (seed_everything) must not draw the same crops for their batches."""

    def views(rank: int) -> torch.Tensor:
        torch.manual_seed(5)  # what seed_everything does on every rank
        dm = ShapesDataModule(train_size=16, val_size=8, batch_size=8, num_workers=0, augment_on="device")

        class Trainer:
            training = True
            global_rank = rank

        dm.trainer = Trainer()  # type: ignore[assignment]
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return dm.on_after_batch_transfer((images, torch.zeros(8, dtype=torch.long)), 0)[0][0]

    assert torch.equal(views(0), views(0)), "a rank's draws are reproducible"
    assert not torch.allclose(views(0), views(1)), "two ranks drew the same augmentation"


def test_the_draws_are_all_the_randomness_and_transform_compiles_as_one_graph() -> None:
    """``augment`` is ``transform`` of one ``draw`` (so compiled and eager augmentations make the same
    crops, orders and factors), and ``transform`` traces into one graph without breaks, which is what
    ``compile_augmentation`` compiles (``aot_eager``: traced, run by the same kernels)."""
    images = (torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    settings = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), solarization_prob=0.3)
    aug = DeviceAugmentation(8, **settings, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    replay = DeviceAugmentation(8, **settings, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    views = aug.augment(images)
    assert torch.equal(views, replay.transform(images, replay.draw(16)))
    draws = aug.draw(16)
    traced = torch.compile(aug.transform, backend="aot_eager", fullgraph=True, dynamic=False)
    assert torch.equal(traced(images, draws), aug.transform(images, draws))
    assert not torch.equal(aug.transform(images, aug.draw(16)), aug.transform(images, draws)), "new draws, new views"


def test_compile_augmentation_reaches_the_device_augmentation() -> None:
    dm = ShapesDataModule(train_size=16, val_size=8, batch_size=8, num_workers=0, augment_on="device", compile_augmentation="reduce-overhead")
    aug = dm.device_augmentation()
    assert aug.compile_augmentation == "reduce-overhead"
    assert not aug._in_cuda_graphs(torch.zeros(1)), "CUDA graphs only on a GPU"
    assert "compile_augmentation" not in repr(ShapesDataModule(augment_on="device").device_augmentation())
    aug._compiled = aug.transform  # as if compiled: bound to this object
    copied = pickle.loads(pickle.dumps(aug))  # spawned processes, deepcopy: the copy compiles its own
    assert copied._compiled is None and copied.compile_augmentation == "reduce-overhead"


def test_compile_augmentation_takes_its_mode_with_mix_order_reduction_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The augmentation compiles with its mode's Inductor options and mix-order reduction off, as
    the encoder does, and with static shapes."""
    from torch._inductor import config

    if not hasattr(config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    aug = DeviceAugmentation(8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), generator=torch.Generator().manual_seed(0),
                             compile_augmentation="reduce-overhead")
    aug.augment(torch.zeros(4, 3, 12, 12, dtype=torch.uint8))
    aug.augment(torch.zeros(4, 3, 12, 12, dtype=torch.uint8))
    assert calls == [{"options": {"triton.cudagraphs": True, "triton.mix_order_reduction": False}, "dynamic": False}]


@pytest.mark.slow
def test_compiled_augmentation_matches_eager_on_the_cpu() -> None:
    """Compiled by inductor (about a minute on a CPU), ``"reduce-overhead"`` mode (on the CPU,
    without CUDA graphs): the same views as eager, from the same generator, up to rounding."""
    torch._dynamo.reset()
    images = (torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    settings = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), blur_prob=0.5)
    eager = DeviceAugmentation(8, **settings, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    compiled = DeviceAugmentation(8, **settings, generator=torch.Generator().manual_seed(3),  # type: ignore[arg-type]
                                  compile_augmentation="reduce-overhead")
    for _ in range(2):  # the second call runs the compiled code without compiling
        # measured 3e-6 to 2e-5 (inductor fuses and reorders float operations; normalised values
        # up to about 4); one image's flip draw changed moves views by 4.1, other draws by 5.0
        torch.testing.assert_close(compiled.augment(images), eager.augment(images), atol=1e-4, rtol=0)
