"""The two-view pretraining augmentation, batched, on whatever device the images are on.

:class:`DeviceAugmentation` takes a batch of uint8 images ``(B, 3, H, W)`` (on the GPU, after
the loader shipped them) and returns two augmented float views, each image and view with its
own random parameters, drawn on the device: nothing is read back to the host, so a training
step on the GPU never waits for the CPU. It follows the CPU pipeline of
:func:`adios_pl.data.transforms.pretrain_transform` op for op (RandomResizedCrop with the same
parameter sampling, colour jitter in a random order per image, grayscale, Gaussian blur,
solarisation, flip, normalisation); ``tests/test_device_augment.py`` compares the two
pipelines' statistics and each colour op with torchvision's. Differences, all small:

- the crop is resized bicubically from the whole image (taps past the crop edge read the real
  neighbouring pixels, not a repeated edge), and crops larger than the output are averaged
  over their area (``roi_align``) instead of torchvision's antialiased bicubic;
- the colour ops work in float, without torchvision's rounding to uint8 after each op.

Why not kornia: its augmentations decide per op on the host whether any image of the batch
is transformed (``bool(to_apply.any())`` in kornia 0.9's ``augmentation/_2d/base.py``), which
is the host synchronisation this path exists to avoid, and its ``ColorJitter`` draws one
order of the four ops per batch, not per image.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from adios_pl.checks import check_compile_setting, compile_options, replays_as_cuda_graphs

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many crops before the fallback
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the colour jitter's ops, in torchvision's numbering


def crop_boxes(
    target: Tensor, aspect: Tensor, top: Tensor, left: Tensor, height: int, width: int,
    scale: tuple[float, float], ratio: tuple[float, float],
) -> Tensor:
    """``(n, 4)`` crop boxes ``(top, left, h, w)`` from uniform draws in [0, 1), as torchvision's
    RandomResizedCrop picks them.

    Per image: ``attempts`` draws (the columns of ``target`` and ``aspect``, ``(n, attempts)``)
    of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first that
    fits is kept, else the centre crop with the ratio clamped. ``top`` and ``left`` ``(n,)``
    place the crop. Vectorised: the first fit is selected, nothing is read back.
    """
    area = height * width
    target = area * (target * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(aspect * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height  # the fallback: a centre crop with the ratio clamped into range
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    top = torch.where(found, torch.floor(top * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(left * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def sample_crops(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    device: torch.device, generator: torch.Generator | None = None, attempts: int = CROP_ATTEMPTS,
) -> Tensor:
    """``(n, 4)`` crop boxes ``(top, left, h, w)`` drawn as torchvision's RandomResizedCrop
    (:func:`crop_boxes` of ``2 * attempts + 2`` uniform draws per image)."""
    u = torch.rand(n, 2 * attempts + 2, device=device, generator=generator)
    return crop_boxes(u[:, :attempts], u[:, attempts : 2 * attempts], u[:, -2], u[:, -1], height, width, scale, ratio)


def _columns(counts: dict[str, int]) -> dict[str, slice]:
    starts = itertools.accumulate(counts.values(), initial=0)
    return {name: slice(start, start + count) for (name, count), start in zip(counts.items(), starts)}


#: Columns of the uniform draws :meth:`DeviceAugmentation.draw` makes per image: everything random
#: in one augmentation (the columns of ops that are off go unused).
DRAW_COLUMNS = _columns({
    "target": CROP_ATTEMPTS, "aspect": CROP_ATTEMPTS, "top": 1, "left": 1,  # the crop
    "jitter": 1, "factors": 3, "hue": 1, "order": 4,  # the colour jitter
    "grayscale": 1, "sigma": 1, "blur": 1, "solarize": 1, "flip": 1,
})
DRAWS_PER_IMAGE = max(columns.stop for columns in DRAW_COLUMNS.values())


def _chance(u: Tensor, p: float) -> Tensor:
    """Whether each image's op applies, ``(n, 1, 1, 1)``, from its uniform draw ``u`` ``(n, 1)``."""
    return (u < p).view(-1, 1, 1, 1)


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``boxes`` ``(top, left, h, w)`` out of float ``images`` ``(B, C, H, W)`` and resize each
    to ``size x size``: bicubic where the crop is enlarged, an area average where it shrinks."""
    b = images.shape[0]
    top, left, h, w = boxes.unbind(1)
    k = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # output pixel centres
    # sample points in pixel-index coordinates, then in grid_sample's [-1, 1] (align_corners=False)
    xs = left[:, None] + k[None] * w[:, None] - 0.5
    ys = top[:, None] + k[None] * h[:, None] - 0.5
    gx = (2 * xs + 1) / images.shape[-1] - 1
    gy = (2 * ys + 1) / images.shape[-2] - 1
    grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], dim=-1)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    if images.shape[-1] > size or images.shape[-2] > size:  # some crops may shrink: average over their area
        rois = torch.stack([torch.arange(b, device=images.device, dtype=images.dtype), left, top, left + w, top + h], dim=1)
        averaged = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        shrinks = ((w > size) | (h > size))[:, None, None, None]
        out = torch.where(shrinks, averaged, out)
    return out


@functools.lru_cache(maxsize=8)
def _gray_weights(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The luma weights ``(1, 3, 1, 1)``, copied to each device once (a copy per call would wait
    for the device)."""
    return torch.tensor(GRAY_WEIGHTS, dtype=dtype).view(1, 3, 1, 1).to(device)


def grayscale(images: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images, with torchvision's weights (a product and a sum: a
    1x1 convolution would run in TF32 on recent GPUs)."""
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    else:
        weights = _gray_weights(images.device, images.dtype)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` in [0, 1]; exactly ``a`` at factor 1."""
    return torch.lerp(b, a, factor).clamp(0, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by ``factor`` ``(B, 1, 1, 1)``."""
    return (images * factor).clamp(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its mean luma."""
    return _blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale version."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (fractions of a turn, ``(B, 1, 1, 1)``) through HSV."""
    r, g, b = images.unbind(1)
    minc, maxc = torch.aminmax(images, dim=1)
    delta = maxc - minc
    chromatic = delta > 0
    rc, gc, bc = ((maxc.unsqueeze(1) - images) / torch.where(chromatic, delta, 1.0).unsqueeze(1)).unbind(1)
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chromatic, (hue / 6.0) % 1.0, 0.0)
    lit = maxc > 0
    sat = torch.where(lit, delta / torch.where(lit, maxc, 1.0), 0.0)
    hue = (hue + shift[:, 0]) % 1.0
    # HSV -> RGB: each channel from the distance of its sector to the hue
    n = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no host copy)
    k = (n + hue.unsqueeze(1) * 6.0) % 6.0
    value = maxc.unsqueeze(1)
    return value - value * sat.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0, 1)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, one ``sigma`` per image, reflect padding (torchvision's kernel)."""
    b, c, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    flat = images.reshape(1, b * c, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, height, width)


class DeviceAugmentation(nn.Module):
    """Two views of a uint8 batch ``(B, 3, H, W)`` under the published pretraining augmentation.

    The arguments are those of :func:`~adios_pl.data.transforms.pretrain_transform` (same
    meaning, same defaults); ``generator`` (a ``torch.Generator`` on the images' device)
    makes the draws reproducible apart from the global seed.

    An augmentation is its random draws (:meth:`draw`: one matrix of uniform numbers, one
    kernel) and a function of the images and the draws (:meth:`transform`: about 210 kernel
    launches at 32 px, where a GPU step is limited by the host's launches). ``compile_augmentation`` (``True`` or a ``torch.compile`` mode, as
    ``ADIOSModule``'s ``compile_encoder``) compiles :meth:`transform` into a few fused kernels, or,
    in ``"reduce-overhead"`` mode, one CUDA-graph replay. The draws stay eager, from the same
    generator, so compiled and eager augmentations make the same crops, orders and factors.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        min_scale: float = 0.08,
        brightness: float = 0.8,
        contrast: float = 0.8,
        saturation: float = 0.8,
        hue: float = 0.2,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        flip_prob: float = 0.5,
        solarization_prob: float = 0.0,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
        compile_augmentation: bool | str = False,
    ) -> None:
        super().__init__()
        check_compile_setting("compile_augmentation", compile_augmentation)
        self.compile_augmentation = compile_augmentation
        self._compiled: Callable[[Tensor, Tensor], Tensor] | None = None
        self.image_size = image_size
        self.scale = (min_scale, 1.0)
        self.ratio = ratio
        self.jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.jitter_prob, self.grayscale_prob, self.blur_prob = jitter_prob, grayscale_prob, blur_prob
        self.flip_prob, self.solarization_prob = flip_prob, solarization_prob
        self.blur_kernel = max(3, (image_size // 10) | 1)  # as the CPU pipeline
        self.generator = generator
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # brightness, contrast and saturation factors: uniform in [max(0, 1 - s), 1 + s]; 1 at s = 0
        strengths = [self.jitter[name] for name in JITTER_OPS[:3]]
        low = torch.tensor([max(0.0, 1 - s) if s > 0 else 1.0 for s in strengths])
        self.factor_low: Tensor
        self.factor_span: Tensor
        self.register_buffer("factor_low", low, persistent=False)
        self.register_buffer("factor_span", torch.tensor([1 + s if s > 0 else 1.0 for s in strengths]) - low, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(view_1, view_2)``, float ``(B, 3, image_size, image_size)``, normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceAugmentation takes uint8 images (B, 3, H, W), got shape {tuple(images.shape)}")
        views = self.augment(torch.cat([images, images]))
        return views[: images.shape[0]], views[images.shape[0]:]

    def augment(self, images: Tensor) -> Tensor:
        """One independent draw of the augmentation for every image of ``images``."""
        if self.mean.device != images.device:
            self.to(images.device)
        draws = self.draw(images.shape[0])
        if not self.compile_augmentation:
            return self.transform(images, draws)
        if self._compiled is None:  # the shapes are static (whole batches): no dynamic shapes
            self._compiled = torch.compile(self.transform, options=compile_options(self.compile_augmentation), dynamic=False)
        views = self._compiled(images, draws)
        # replayed as CUDA graphs, the views live in the graphs' memory, which the next batch's
        # replay overwrites while callbacks may still hold this batch
        return views.clone() if self._in_cuda_graphs(images) else views

    def draw(self, n: int) -> Tensor:
        """Everything random in the augmentation of ``n`` images: ``(n, DRAWS_PER_IMAGE)`` uniform
        draws in [0, 1) from :attr:`generator`, one kernel on the device. :data:`DRAW_COLUMNS` names
        the columns: crop attempts and placement, whether each op applies, the jitter's factors,
        hue shift and order, the blur's sigma. :meth:`transform` turns them into parameters."""
        return torch.rand(n, DRAWS_PER_IMAGE, device=self.mean.device, generator=self.generator)

    def transform(self, images: Tensor, draws: Tensor) -> Tensor:
        """The augmentation of ``images`` (uint8, or float in [0, 1]) under ``draws``
        (:meth:`draw`): a function of its inputs only, which is what ``compile_augmentation``
        compiles."""
        def u(name: str) -> Tensor:
            return draws[:, DRAW_COLUMNS[name]]

        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        boxes = crop_boxes(u("target"), u("aspect"), u("top")[:, 0], u("left")[:, 0], x.shape[-2], x.shape[-1], self.scale, self.ratio)
        x = resized_crops(x, boxes, self.image_size).clamp(0, 1)
        if self.jitter_prob > 0:
            x = torch.where(_chance(u("jitter"), self.jitter_prob), self._color_jitter(x, draws), x)
        if self.grayscale_prob > 0:
            x = torch.where(_chance(u("grayscale"), self.grayscale_prob), grayscale(x).expand_as(x), x)
        if self.blur_prob > 0:
            sigma = u("sigma")[:, 0] * 1.9 + 0.1  # uniform in [0.1, 2.0)
            x = torch.where(_chance(u("blur"), self.blur_prob), gaussian_blur(x, self.blur_kernel, sigma), x)
        if self.solarization_prob > 0:  # the CPU pipeline's threshold 128 of 255
            x = torch.where(_chance(u("solarize"), self.solarization_prob) & (x >= 128 / 255), 1 - x, x)
        if self.flip_prob > 0:
            x = torch.where(_chance(u("flip"), self.flip_prob), x.flip(-1), x)
        return (x - self.mean) / self.std

    def _in_cuda_graphs(self, images: Tensor) -> bool:
        return replays_as_cuda_graphs(self.compile_augmentation, images.device)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned processes) without the compiled function, which is made again on use."""
        return {**self.__dict__, "_compiled": None}

    def jitter_parameters(self, draws: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The colour jitter's parameters under ``draws`` (:meth:`draw`): each image's brightness,
        contrast and saturation factors ``(n, 3)``, uniform in ``[max(0, 1 - s), 1 + s]`` (1 for an
        op of strength 0), hue shift ``(n, 1, 1, 1)``, uniform in ``[-h, h]`` (None at strength 0),
        and order of the four ops ``(n, 4)``, a uniform permutation (op 3 is the hue)."""
        factors = torch.addcmul(self.factor_low, draws[:, DRAW_COLUMNS["factors"]], self.factor_span)
        h = self.jitter["hue"]
        shift = (draws[:, DRAW_COLUMNS["hue"]] * (2 * h) - h).view(-1, 1, 1, 1) if h > 0 else None
        order = draws[:, DRAW_COLUMNS["order"]].argsort(dim=1)
        return factors, shift, order

    def _color_jitter(self, x: Tensor, draws: Tensor) -> Tensor:
        """torchvision's ColorJitter under ``draws`` (:meth:`jitter_parameters`): factors drawn per
        image, the four ops in a random order per image.

        Without branching per image: brightness, contrast and saturation at factor 1 leave an
        image in [0, 1] unchanged exactly, so each position of the order applies all three, each
        with its image's factor where that op is the image's op there and 1 elsewhere. The hue
        (a round trip through HSV, which is not exact at shift 0) runs once, for every image,
        between the positions before and after its place in the image's order: three positions
        before it, three after, one hue instead of one per position.
        """
        n, device = x.shape[0], x.device
        factors, shift, order = self.jitter_parameters(draws)
        # the factor of op k at position p, (n, 4, 3): the image's own where op k is its op at p, 1 elsewhere
        positions = torch.arange(4, device=device)
        hue_at = (order == 3).to(torch.uint8).argmax(dim=1, keepdim=True)  # op 3 is the hue
        at = order.unsqueeze(-1) == torch.arange(3, device=device)
        factor = factors.unsqueeze(1)
        before = torch.where(at & (positions < hue_at).unsqueeze(-1), factor, 1.0)
        after = torch.where(at & (positions > hue_at).unsqueeze(-1), factor, 1.0)
        ops = [(k, op) for k, op in enumerate((adjust_brightness, adjust_contrast, adjust_saturation)) if self.jitter[JITTER_OPS[k]] > 0]
        for position in range(3):  # the positions before the hue's (at most three)
            for k, op in ops:
                x = op(x, before[:, position, k].view(n, 1, 1, 1))
        if shift is not None:
            x = adjust_hue(x, shift)
        for position in range(1, 4):  # and after it
            for k, op in ops:
                x = op(x, after[:, position, k].view(n, 1, 1, 1))
        return x

    def extra_repr(self) -> str:
        """The pipeline's settings, for ``repr``."""
        return (
            f"image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, jitter={self.jitter}, "
            f"jitter_prob={self.jitter_prob}, grayscale_prob={self.grayscale_prob}, blur_prob={self.blur_prob}, "
            f"solarization_prob={self.solarization_prob}, flip_prob={self.flip_prob}"
            + (f", compile_augmentation={self.compile_augmentation!r}" if self.compile_augmentation else "")
        )
