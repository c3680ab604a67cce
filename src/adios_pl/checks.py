"""Checks of what users hand ADIOSModule: its arguments, a mask generator passed in, training batches."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from adios_pl.errors import BatchFormatError
from adios_pl.masks import MASK_NORMS, RANDOM_MASK_TYPES
from adios_pl.modes import eval_mode
from adios_pl.optim import OPTIMIZERS

MASK_MODES = ("all", "one")
SCHEDULE_INTERVALS = ("step", "epoch")
#: ``torch.compile`` modes that the ``compile_*`` arguments (``compile_encoder``,
#: ``compile_mask_generator``, ``compile_objective``, ``compile_optimizers``, the DataModules'
#: ``compile_augmentation``) accept by name.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes among them that replay the compiled code as CUDA graphs on a GPU.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_setting(name: str, setting: Any) -> None:
    """Check a ``compile_*`` argument: ``True``, ``False`` or a ``torch.compile`` mode by name."""
    if not isinstance(setting, bool) and setting not in COMPILE_MODES:
        raise ValueError(
            f"{name}={setting!r} is not supported; accepted: True, False or a torch.compile mode "
            f"({', '.join(map(repr, COMPILE_MODES))})"
        )


def compile_options(setting: bool | str) -> dict[str, Any]:
    """The Inductor options for a part compiled with ``setting`` (a ``compile_*`` argument):
    the mode's own options (``torch._inductor.list_mode_options``), with Inductor's mix-order
    reduction off where this torch has it. That GPU-only fusion of reductions over different
    dimensions fails on the batched encoder's batch norm in torch 2.11 ("AssertionError: 512 v.s.
    2560", pytorch/pytorch#177419); with it off, ResNet18 ADIOS compiled in "reduce-overhead"
    trained at 5,875 images/s on an H100 (benchmarks/results/train_speed_gpu.json)."""
    from torch._inductor import config, list_mode_options

    options: dict[str, Any] = dict(list_mode_options("default" if setting is True else str(setting)))
    if hasattr(config.triton, "mix_order_reduction"):
        options["triton.mix_order_reduction"] = False
    return options


def replays_as_cuda_graphs(setting: bool | str, device: torch.device) -> bool:
    """Whether a part compiled with ``setting`` (a ``compile_*`` argument) replays as CUDA graphs
    on ``device``: a CUDA-graph mode, on a GPU. Its outputs then live in the graphs' memory,
    which the next replay overwrites."""
    return setting in CUDA_GRAPH_MODES and device.type == "cuda"


def check_mask_generator(mask_generator: nn.Module, num_masks: int, image_size: int) -> None:
    """Check a mask generator passed in: it says its ``num_masks`` (equal to ``num_masks``) and maps
    ``(B, 3, S, S)`` to ``(B, N, S, S)`` masks that sum to 1 over N."""
    if not isinstance(mask_generator, nn.Module):
        raise TypeError(f"mask_generator must be an nn.Module, got {type(mask_generator).__name__}")
    slots = getattr(mask_generator, "num_masks", None)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 2:
        raise TypeError(f"mask_generator must have an integer attribute num_masks >= 2; {type(mask_generator).__name__} has {slots!r}")
    if slots != num_masks:
        raise ValueError(
            f"num_masks={num_masks} but mask_generator has num_masks={slots}; pass num_masks={slots} "
            "(num_masks and the other mask_* arguments only build the default mask generator)"
        )
    parameter = next(mask_generator.parameters(), None)
    images = torch.zeros(2, 3, image_size, image_size, device=parameter.device if parameter is not None else "cpu",
                         dtype=parameter.dtype if parameter is not None else torch.float32)
    with eval_mode(mask_generator), torch.no_grad():
        masks = mask_generator(images)
    if not isinstance(masks, Tensor) or tuple(masks.shape) != (2, slots, image_size, image_size):
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"mask_generator must map (B, 3, {image_size}, {image_size}) to (B, {slots}, {image_size}, {image_size}); got {shape}")
    if not torch.allclose(masks.sum(dim=1), torch.ones_like(masks[:, 0]), atol=1e-3):
        raise ValueError("mask_generator's masks must sum to 1 over the slots at every pixel (e.g. a softmax over dim 1)")


def check_arguments(**kw: Any) -> None:
    """Clear errors for arguments a user can get wrong, at construction time."""
    num_masks = kw["num_masks"]
    if not isinstance(num_masks, int) or isinstance(num_masks, bool) or num_masks < 0:
        raise ValueError(f"num_masks must be an integer >= 0 (0 = no masks, the baseline), got {num_masks!r}")
    if num_masks == 1:
        raise ValueError("num_masks=1 is not allowed: a single slot always covers the whole image; use 0 or >= 2")
    if kw["mask_mode"] not in MASK_MODES:
        raise ValueError(f"mask_mode={kw['mask_mode']!r} is not supported; accepted: 'all' (ADIOS), 'one' (ADIOS-s)")
    if kw["mask_type"] not in ("learned", *RANDOM_MASK_TYPES):
        raise ValueError(f"mask_type={kw['mask_type']!r} is not supported; accepted: 'learned', {', '.join(map(repr, RANDOM_MASK_TYPES))}")
    if kw["nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"nonfinite={kw['nonfinite']!r} is not supported; accepted: 'raise', 'skip'")
    if kw["update"] not in ("alternating", "simultaneous"):
        raise ValueError(f"update={kw['update']!r} is not supported; accepted: 'alternating', 'simultaneous'")
    if kw["masked_views"] not in ("sequential", "batched"):
        raise ValueError(f"masked_views={kw['masked_views']!r} is not supported; accepted: 'sequential', 'batched'")
    for name in ("compile_encoder", "compile_mask_generator", "compile_objective", "compile_optimizers"):
        check_compile_setting(name, kw[name])
    if kw["mask_norm"] not in MASK_NORMS:
        raise ValueError(f"mask_norm={kw['mask_norm']!r} is not supported; accepted: {list(MASK_NORMS)}")
    if kw["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer={kw['optimizer']!r} is not supported; accepted: {list(OPTIMIZERS)}")
    if kw["compile_optimizers"] and kw["optimizer"] == "adamw":
        raise ValueError(
            "compile_optimizers works with optimizer='sgd' or 'lars', not 'adamw' (its compiled multi-tensor "
            "update needs its state on the GPU, which a resumed run does not have); set compile_optimizers=False"
        )
    patch = kw.get("mask_patch_size")
    if patch is not None and (not isinstance(patch, int) or isinstance(patch, bool) or patch < 1):
        raise ValueError(f"mask_patch_size must be an integer >= 1 or None, got {patch!r}")
    size = kw["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {size!r}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for name in ("sparsity_weight", "entropy_weight", "weight_decay", "warmup_epochs", "min_lr_factor"):
        if not number(kw[name]) or kw[name] < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {kw[name]!r}")
    if kw["min_lr_factor"] > 1:
        raise ValueError(f"min_lr_factor must be in [0, 1] (the final rate as a fraction of lr), got {kw['min_lr_factor']!r}")
    for name in ("lr", "mask_lr"):
        if not number(kw[name]) or kw[name] <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {kw[name]!r}")
    if kw["schedule_interval"] not in SCHEDULE_INTERVALS:
        raise ValueError(f"schedule_interval={kw['schedule_interval']!r} is not supported; accepted: 'step', 'epoch'")
    if not number(kw["warmup_start_lr"]) or kw["warmup_start_lr"] < 0:
        raise ValueError(f"warmup_start_lr must be a finite number >= 0, got {kw['warmup_start_lr']!r}")


def unpack_training_batch(batch: Any, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(view_1, view_2, targets)`` of a training batch ``((view_1, view_2), targets, *extra)``,
    checked: two views ``(B, 3, image_size, image_size)`` of the same shape and targets ``(B,)``.

    What follows the targets is not used: lightly's ``LightlyDataset`` adds the file names.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise BatchFormatError(
            "a training batch must be (views, targets): views a sequence of two tensors "
            f"(B, 3, H, W) and targets a LongTensor (B,); got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        )
    views, targets = batch[0], batch[1]
    if not isinstance(views, (list, tuple)) or len(views) != 2 or not all(isinstance(v, Tensor) for v in views):
        raise BatchFormatError("views must be a sequence of two tensors (B, 3, H, W)")
    x1, x2 = views
    if x1.shape != x2.shape:
        raise BatchFormatError(f"the two views must have the same shape; got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dim() != 4 or tuple(x1.shape[1:]) != (3, image_size, image_size):
        raise BatchFormatError(f"views must be (B, 3, {image_size}, {image_size}) for image_size={image_size}; got {tuple(x1.shape)}")
    if not isinstance(targets, Tensor) or targets.shape != (x1.shape[0],):
        raise BatchFormatError(f"targets must be a tensor of shape ({x1.shape[0]},), -1 where unlabelled")
    return x1, x2, targets
