"""The mask generator: the U-Net of ADIOS (adapted from GENESIS) that predicts N soft masks.

- [0] ADIOS, 2022, https://arxiv.org/abs/2201.13100
- [1] GENESIS, 2020, https://arxiv.org/abs/1907.13052
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_NORMS = ("gn", "in", "none")


def default_num_blocks(image_size: int) -> int:
    """The reference's block count ``int(log2(size) - 1)``: 4 at 32 px, 5 at 64/96 px, 6 at 224 px.

    Never fewer than 3, so tiny test images still get a U-Net.
    """
    return max(3, int(math.log2(image_size) - 1))


def _block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3x3 conv (stride 1, pad 1) + norm + ReLU; the conv has a bias only without a norm."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=norm == "none")
    ]
    if norm == "gn":
        layers.append(nn.GroupNorm(8, out_channels))
    elif norm == "in":
        layers.append(nn.InstanceNorm2d(out_channels, affine=True))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MaskGenerator(nn.Module):
    """U-Net that maps images ``(B, 3, H, W)`` to ``num_masks`` soft masks ``(B, N, H, W)``.

    At every pixel the N masks sum to 1 (softmax over slots). The layout reproduces the reference
    for 4 to 6 blocks (ADIOS.md, "The masking network"): down widths ``[c]*(blocks-3) + [2c]*3``,
    nearest x0.5 between down blocks, a bottleneck MLP ``2c*f*f -> 128 -> 128 -> 2c*f*f``, and an
    up path that concatenates the skips. Sizes that are not divisible by ``2**(blocks-1)`` work
    too: down-sampling floors the size and up-sampling returns exactly to each skip's size.

    Args:
        num_masks: N, the number of slots (at least 2).
        image_size: Side of the square input images; the bottleneck MLP is sized for it.
        width: Base width ``c`` (a multiple of 8 with ``norm="gn"``).
        norm: ``"gn"`` (GroupNorm, 8 groups), ``"in"`` (InstanceNorm, affine) or ``"none"``.
        num_blocks: U-Net depth; ``None`` takes the reference's :func:`default_num_blocks`.
    """

    def __init__(
        self,
        num_masks: int,
        image_size: int,
        width: int = 32,
        norm: str = "gn",
        num_blocks: int | None = None,
    ) -> None:
        super().__init__()
        if norm not in MASK_NORMS:
            raise ValueError(f"mask_norm={norm!r} is not supported; accepted: {list(MASK_NORMS)}")
        if not isinstance(num_masks, int) or num_masks < 2:
            raise ValueError(f"num_masks must be an integer >= 2 for a mask generator, got {num_masks!r}")
        if not isinstance(width, int) or width <= 0 or (norm == "gn" and width % 8):
            raise ValueError(
                f"mask_width must be a positive integer (a multiple of 8 with mask_norm='gn'), got {width!r}"
            )
        num_blocks = default_num_blocks(image_size) if num_blocks is None else num_blocks
        sizes = [image_size]
        for _ in range(num_blocks - 1):
            sizes.append(sizes[-1] // 2)
        if num_blocks < 3 or sizes[-1] < 1:
            raise ValueError(
                f"image_size={image_size} is too small for a {num_blocks}-block mask generator "
                "(need image_size >= 2**(blocks-1) and blocks >= 3)"
            )
        self.num_masks = num_masks
        self.image_size = image_size
        self.width, self.norm, self.num_blocks = width, norm, num_blocks  # read back by checkpoints

        down_channels = [width] * (num_blocks - 3) + [2 * width] * 3
        self.down = nn.ModuleList()
        in_channels = 3
        for out_channels in down_channels:
            self.down.append(_block(in_channels, out_channels, norm))
            in_channels = out_channels

        bottom = sizes[-1]
        flat = 2 * width * bottom * bottom
        self.bottleneck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, flat),
            nn.ReLU(inplace=True),
        )
        self._bottom_shape = (2 * width, bottom, bottom)

        skips = down_channels[::-1]
        self.up = nn.ModuleList()
        current = 2 * width
        for i, skip in enumerate(skips):
            out_channels = skips[i + 1] if i + 1 < len(skips) else width
            self.up.append(_block(current + skip, out_channels, norm))
            current = out_channels
        self.head = nn.Conv2d(width, num_masks, kernel_size=1)

    def logits(self, images: Tensor) -> Tensor:
        """Unnormalised slot scores ``(B, N, H, W)``."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"the mask generator was built for images (B, 3, {self.image_size}, {self.image_size}); "
                f"got {tuple(images.shape)} (set image_size to the size of the training views)"
            )
        skips = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x)
            skips.append(x)
            if i + 1 < len(self.down):
                x = F.interpolate(x, scale_factor=0.5, mode="nearest")
        x = self.bottleneck(x).view(x.shape[0], *self._bottom_shape)
        skips.reverse()
        for i, block in enumerate(self.up):
            x = block(torch.cat([x, skips[i]], dim=1))
            if i + 1 < len(self.up):
                x = F.interpolate(x, size=skips[i + 1].shape[-2:], mode="nearest")
        return self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        """Soft masks ``(B, N, H, W)`` that sum to 1 over the slot dimension."""
        return self.logits(images).softmax(dim=1)


RANDOM_MASK_TYPES = ("random_patch", "random_block")


#: Rectangles drawn per slot by the ``random_block`` masks before the remainder is filled at random.
BLOCK_ATTEMPTS = 50


class RandomMasks(nn.Module):
    """Random masks as a baseline for learned ones: N slots that partition the image.

    The image is cut into a grid of ``patch_size`` squares and every cell goes to one slot, so
    each slot hides about ``1/N`` of the image -- the mean area of learned masks, which also sum
    to 1 over slots.

    - ``"random_patch"`` (MAE-style): cells are dealt to slots uniformly at random.
    - ``"random_block"`` (BEiT-style): slots 1..N-1 each grow from random rectangles of cells
      (aspect ratio 0.3-3.3) until they hold ``1/N`` of the cells; the last slot takes the rest.

    - [0] MAE, 2021, https://arxiv.org/abs/2111.06377
    - [1] BEiT, 2021, https://arxiv.org/abs/2106.08254

    Args:
        num_masks: N (at least 2).
        image_size: Side of the square images.
        kind: ``"random_patch"`` or ``"random_block"``.
        patch_size: Cell side; ``None`` takes ``image_size // 8`` (at least 1).
    """

    def __init__(self, num_masks: int, image_size: int, kind: str = "random_patch", patch_size: int | None = None) -> None:
        super().__init__()
        if kind not in RANDOM_MASK_TYPES:
            raise ValueError(f"kind={kind!r} is not supported; accepted: {list(RANDOM_MASK_TYPES)}")
        if not isinstance(num_masks, int) or num_masks < 2:
            raise ValueError(f"num_masks must be an integer >= 2, got {num_masks!r}")
        self.num_masks = num_masks
        self.image_size = image_size
        self.kind = kind
        if patch_size is not None and (not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1):
            raise ValueError(f"patch_size must be an integer >= 1 or None, got {patch_size!r}")
        self.patch_size = patch_size or max(1, image_size // 8)
        self.cells = -(-image_size // self.patch_size)
        self.generator: torch.Generator | None = None

    def _rand(self, *shape: int, device: torch.device) -> Tensor:
        generator = self.generator if self.generator is not None and self.generator.device == device else None
        return torch.rand(*shape, device=device, generator=generator)

    def _patch_slots(self, batch: int, device: torch.device) -> Tensor:
        g2 = self.cells**2
        rank = self._rand(batch, g2, device=device).argsort(dim=1).argsort(dim=1)
        return (rank * self.num_masks // g2).view(batch, self.cells, self.cells)

    def _block_slots(self, batch: int, device: torch.device) -> Tensor:
        """BEiT-style blocks, all images at once: each attempt draws one rectangle per image and
        takes its free cells (in raster order) up to the slot's quota. After ``BLOCK_ATTEMPTS``
        attempts (enough for all but about 1 in 1,000 images at N=6, 8x8 cells) any cells
        still missing are taken at random among the free ones."""
        g, n = self.cells, self.num_masks
        target = g * g // n
        slots = torch.full((batch, g * g), n - 1, dtype=torch.long, device=device)
        free = torch.ones(batch, g * g, dtype=torch.bool, device=device)
        cells = torch.arange(g, device=device, dtype=torch.float32)
        rows, cols = cells.view(1, g, 1), cells.view(1, 1, g)
        low, high = math.log(0.3), math.log(1 / 0.3)
        for slot in range(n - 1):
            count = torch.zeros(batch, device=device)
            for _ in range(BLOCK_ATTEMPTS):
                remaining = (target - count).clamp(min=0)
                area = 1 + self._rand(batch, device=device) * (remaining.clamp(min=1) - 1)
                aspect = torch.exp(low + self._rand(batch, device=device) * (high - low))
                h = torch.round(torch.sqrt(area * aspect)).clamp(1, g).view(batch, 1, 1)
                w = torch.round(torch.sqrt(area / aspect)).clamp(1, g).view(batch, 1, 1)
                top = torch.floor(self._rand(batch, 1, 1, device=device) * (g - h + 1))
                left = torch.floor(self._rand(batch, 1, 1, device=device) * (g - w + 1))
                region = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)).view(batch, -1)
                candidates = region & free
                take = candidates & (candidates.cumsum(dim=1) <= remaining.view(batch, 1))
                free &= ~take
                slots = torch.where(take, slot, slots)
                count += take.sum(dim=1)
            # the rare image still short of its quota: random free cells
            order = (self._rand(batch, g * g, device=device) + (~free).float()).argsort(dim=1).argsort(dim=1)
            take = free & (order < (target - count).clamp(min=0).view(batch, 1))
            free &= ~take
            slots = torch.where(take, slot, slots)
        return slots.view(batch, g, g)

    def _slots(self, batch: int, device: torch.device) -> Tensor:
        """The slot of every cell, ``(B, cells, cells)``."""
        return self._patch_slots(batch, device) if self.kind == "random_patch" else self._block_slots(batch, device)

    @torch.no_grad()
    def segments(self, batch: int, height: int, width: int, device: torch.device) -> Tensor:
        """The slot of every pixel, ``(B, H, W)`` long, drawn on ``device``."""
        slots = self._slots(batch, device)
        return slots.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)[:, :height, :width]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Hard masks ``(B, N, H, W)`` that partition each image; no gradient."""
        batch, device = images.shape[0], images.device
        slots = self._slots(batch, device)
        masks = F.one_hot(slots, self.num_masks).permute(0, 3, 1, 2).to(images.dtype)  # at cell resolution, then up
        masks = masks.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
        return masks[..., : images.shape[-2], : images.shape[-1]]
