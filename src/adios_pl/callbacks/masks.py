"""Mask pictures and mask quality while training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from adios_pl.backend import TensorBoardLogger, TrainerFn, pl
from adios_pl.callbacks.base import EvaluationCallback, batch_parts
from adios_pl.distributed import gather_in_order
from adios_pl.metrics import adjusted_rand_index, foreground_ari, random_patch_segmentation, segmentation_coverings

#: Distinct colours for the argmax segmentation (Okabe-Ito, then a few more).
PALETTE = torch.tensor([
    [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178], [213, 94, 0],
    [204, 121, 167], [0, 0, 0], [153, 153, 153], [128, 0, 128], [255, 255, 255], [0, 128, 128],
], dtype=torch.float32) / 255


def _mask_generator(pl_module: pl.LightningModule) -> Any:
    return getattr(pl_module, "mask_generator", None)


def mask_grid(images: Tensor, masks: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, scale: int = 1) -> Tensor:
    """One row per image: the image, each mask, the argmax segmentation, each masked image.

    Args:
        images: Normalised images ``(B, 3, H, W)``.
        masks: Soft masks ``(B, N, H, W)``.
        mean: Normalisation mean to undo (``None``: rescale each image to [0, 1]).
        std: Normalisation std to undo.
        scale: Nearest-neighbour up-sampling factor for small images.

    Returns:
        A ``(3, H', W')`` picture in [0, 1].
    """
    b, n = masks.shape[:2]
    if mean is not None and std is not None:
        pictures = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        pictures = (images - low) / (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
    pictures = pictures.clamp(0, 1)
    soft = masks.unsqueeze(2).expand(b, n, 3, *masks.shape[-2:])
    segmentation = PALETTE[masks.argmax(dim=1) % len(PALETTE)].permute(0, 3, 1, 2)
    # a hidden pixel becomes 0 after normalisation, i.e. the data mean colour: show it so
    fill = torch.tensor(mean).view(1, 1, 3, 1, 1) if mean is not None else torch.full((1, 1, 3, 1, 1), 0.5)
    hidden = pictures.unsqueeze(1) * (1 - masks.unsqueeze(2)) + fill * masks.unsqueeze(2)
    rows = torch.cat([pictures.unsqueeze(1), soft, segmentation.unsqueeze(1), hidden], dim=1)  # (B, 2N+2, 3, H, W)
    tiles = rows.flatten(0, 1)
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    return make_grid(tiles, nrow=2 * n + 2, padding=2, pad_value=1.0)


class MaskVisualizer(EvaluationCallback):
    """Pictures of the masks of ``num_images`` evaluation images, spread evenly over the split.

    Each row: the image (denormalised), the N soft masks (white = hidden), the argmax
    segmentation in distinct colours, and the N masked images. Logged as ``val/masks`` to
    TensorBoard and to any logger with a ``log_image(key, images, step)`` method (Weights &
    Biases), and written to ``<run dir>/masks/epoch_XXX_step_YYYYYYY.png`` by rank 0 (outside
    ``fit``, e.g. ``adios-pl validate --ckpt_path last``: ``validate_<checkpoint name>.png``).

    Under DDP nothing here is collective: the output folder is resolved on every rank in
    ``setup`` (``trainer.log_dir`` broadcasts), and rank 0 reads its images straight from the
    evaluation dataset, so the other ranks never wait for it.

    Args:
        every_n_epochs: Draw on these epochs.
        num_images: Rows of the picture.
        mean: Normalisation mean; ``None`` takes the DataModule's ``mean``.
        std: Normalisation std; ``None`` takes the DataModule's ``std``.
        out_dir: Where PNGs go; ``None``: ``<logger dir or default_root_dir>/masks``.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, out_dir: str | None = None) -> None:
        super().__init__(every_n_epochs)
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        self.num_images = num_images
        self.mean, self.std = mean, std
        self.out_dir = out_dir
        self.last_path: Path | None = None
        self._root: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the output folder on every rank (``trainer.log_dir`` is a collective call)."""
        self._root = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "masks"

    def _images(self, trainer: pl.Trainer) -> Tensor | None:
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        dataset = getattr(loaders[0], "dataset", None) if loaders else None
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        if n == 0:
            return None
        # evenly spaced over the split: a class-sorted folder shows every class
        indices = torch.linspace(0, n - 1, min(self.num_images, n)).round().long().unique().tolist()
        return torch.stack([batch_parts(dataset[i])[0] for i in indices])  # type: ignore[index]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw, log and save the picture (rank 0 only; no collective calls)."""
        if not trainer.is_global_zero or not self._active(trainer):
            return
        generator = _mask_generator(pl_module)
        if generator is None:
            self._warn_once("nomasks", "MaskVisualizer: the module has no mask generator (num_masks=0); no pictures")
            return
        images = self._images(trainer)
        if images is None:
            return
        with torch.no_grad():
            masks = generator(images.to(pl_module.device))
        datamodule = getattr(trainer, "datamodule", None)
        mean = self.mean if self.mean is not None else getattr(datamodule, "mean", None)
        std = self.std if self.std is not None else getattr(datamodule, "std", None)
        scale = max(1, 96 // images.shape[-1])
        grid = mask_grid(images.float().cpu(), masks.float().cpu(), mean, std, scale)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/masks", grid, trainer.global_step)
            elif callable(log_image := getattr(logger, "log_image", None)):  # WandbLogger's API
                log_image(key="val/masks", images=[grid], step=trainer.global_step)
        root = self._root if self._root is not None else Path(self.out_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.last_path = root / self._file_name(trainer)
        save_image(grid, self.last_path)

    @staticmethod
    def _file_name(trainer: pl.Trainer) -> str:
        """``epoch_XXX_step_YYYYYYY.png`` while fitting; otherwise (``validate``, which restores no
        loop state, so epoch and step read 0) the stage and the checkpoint's name, as
        ``validate_last.png``."""
        if trainer.state.fn == TrainerFn.FITTING:
            return f"epoch_{trainer.current_epoch:03d}_step_{trainer.global_step:07d}.png"
        stage = trainer.state.fn.value if trainer.state.fn is not None else "validate"
        checkpoint = Path(str(trainer.ckpt_path)).stem if trainer.ckpt_path else "model"
        return f"{stage}_{checkpoint}.png"


#: What :class:`MaskQuality` logs (``val/<name>``), in the order of its rows of scores.
SCORES = ("mask_fg_ari", "mask_mbo", "mask_fg_ari_random", "mask_ari", "mask_sc")


class MaskQuality(EvaluationCallback):
    """How well the argmax masks match the ground-truth objects (data with segmentations).

    Logs, averaged over the images of the evaluation split, the scores the paper reports:
    ``val/mask_ari`` (adjusted Rand index over all pixels) and ``val/mask_fg_ari`` (over the
    objects' pixels only; torchmetrics' ARI), ``val/mask_sc`` (segmentation covering: each
    object's best IoU with a slot, weighted by its size) and ``val/mask_mbo`` (mean best overlap,
    the same unweighted, GENESIS' mSC); and ``val/mask_fg_ari_random`` for random square patches
    of side ``patch_size`` dealt to the same number of slots, the baseline learned masks should
    beat.

    Args:
        every_n_epochs: Run on these epochs.
        patch_size: Side of the random patches of the baseline.
    """

    def __init__(self, every_n_epochs: int = 1, patch_size: int = 8) -> None:
        super().__init__(every_n_epochs)
        self.patch_size = patch_size
        self._scores: list[Tensor] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start collecting."""
        self._scores = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the argmax masks of one evaluation batch."""
        if dataloader_idx != 0 or not self._active(trainer):
            return
        images, _, segmentation = batch_parts(batch)
        generator = _mask_generator(pl_module)
        if generator is None:
            self._warn_once("nomasks", "MaskQuality: the module has no mask generator (num_masks=0); mask quality is skipped")
            return
        if segmentation is None:
            self._warn_once("noseg", "MaskQuality: validation batches carry no segmentation (only the Shapes data has one); mask quality is skipped")
            return
        with torch.no_grad():
            pred = generator(images).argmax(dim=1)
        rng = torch.Generator().manual_seed(batch_idx)
        random = random_patch_segmentation(len(pred), pred.shape[-1], generator.num_masks, self.patch_size, rng).to(pred.device)
        mean_covering, covering = segmentation_coverings(pred, segmentation)  # one pass over the objects for both
        rows = torch.stack([foreground_ari(pred, segmentation), mean_covering, foreground_ari(random, segmentation),
                            adjusted_rand_index(pred, segmentation), covering], dim=1)
        self._scores.append(rows.to(images.device))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average over the whole evaluation split and log."""
        if not self._scores:
            return
        scores = gather_in_order(torch.cat(self._scores), self._dataset_length(trainer, 0))
        self._scores = []
        means = scores.nanmean(dim=0)
        for name, value in zip(SCORES, means):
            self._log_gathered(pl_module, f"val/{name}", value)
