"""Encoders (backbones): a small registry of image encoders that report ``num_features``.

Every encoder maps images ``(B, 3, H, W)`` to features ``(B, num_features)``, like a timm model
created with ``num_classes=0``. Names choose constructors through :func:`register_encoder`, so a
new backbone is one decorated function, not another branch in an if/elif chain.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor, nn

from adios_pl.modes import eval_mode

EncoderFactory = Callable[..., nn.Module]
_ENCODERS: Dict[str, EncoderFactory] = {}

#: ResNets on images of at most this many pixels get the CIFAR stem (3x3 stride-1, no max-pool).
CIFAR_STEM_MAX_SIZE = 64


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register an encoder constructor under ``name``.

    The constructor takes ``image_size`` as a keyword argument (and any of its own) and returns a
    module with an integer attribute ``num_features``.
    """

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _ENCODERS:
            raise ValueError(f"an encoder named {name!r} is already registered")
        _ENCODERS[name] = factory
        return factory

    return decorator


def list_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder`."""
    return sorted(_ENCODERS)


def create_encoder(name: str, image_size: int, **kwargs: object) -> nn.Module:
    """Build the registered encoder ``name`` for square images of ``image_size`` pixels."""
    if name not in _ENCODERS:
        raise ValueError(f"encoder={name!r} is not a registered encoder; accepted: {list_encoders()}")
    return _ENCODERS[name](image_size=image_size, **kwargs)


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm={norm!r} is not supported; accepted: 'bn', 'gn'")


class SmallConvNet(nn.Module):
    """A six-layer conv net for CPU demos and tests.

    3x3 convolutions of widths ``w, 2w, 2w, 4w, 4w, 8w`` (stride 2 at the second, fourth and
    sixth), each followed by a norm and ReLU, then global average pooling: ``8w`` features.
    With ``width=16`` (128 features, 0.3 M parameters) a 32-px image costs about 9 M
    multiply-adds, 4x less than a ResNet stem stage, so ADIOS trains in CPU minutes.

    Args:
        width: Channels of the first layer.
        norm: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm, batch-independent: what distributed
            equality tests need, since SyncBatchNorm does not run on the CPU).
    """

    def __init__(self, width: int = 16, norm: str = "bn") -> None:
        super().__init__()
        self.width, self.norm = width, norm  # read back by checkpoints
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width]
        strides = [1, 2, 1, 2, 1, 2]
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels, stride in zip(widths, strides):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                _norm2d(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.num_features = in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, num_features)`` of images ``(B, 3, H, W)``."""
        return self.features(x).mean(dim=(2, 3))


@register_encoder("small_cnn")
def small_cnn(image_size: int, width: int = 16, norm: str = "bn") -> nn.Module:
    """The CPU-sized :class:`SmallConvNet` (any image size of at least 4 pixels)."""
    del image_size  # fully convolutional
    return SmallConvNet(width=width, norm=norm)


def _torchvision_resnet(arch: str, image_size: int, zero_init_residual: bool) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if image_size <= CIFAR_STEM_MAX_SIZE:
        # Small images: a 3x3 stride-1 stem without max-pool keeps spatial detail (SimCLR, A.3).
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


@register_encoder("resnet18")
def resnet18(image_size: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-18 without its classifier (512 features); CIFAR stem at <= 64 px."""
    return _torchvision_resnet("resnet18", image_size, zero_init_residual)


@register_encoder("resnet50")
def resnet50(image_size: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-50 without its classifier (2048 features); CIFAR stem at <= 64 px."""
    return _torchvision_resnet("resnet50", image_size, zero_init_residual)


@register_encoder("vit_tiny")
def vit_tiny(image_size: int, patch_size: int | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """timm ViT-Tiny (192 features, class token); patch 16, or 4 on images of <= 64 px."""
    import timm

    if patch_size is None:
        patch_size = 4 if image_size <= CIFAR_STEM_MAX_SIZE else 16
    if image_size % patch_size:
        raise ValueError(
            f"image_size={image_size} is not a multiple of the ViT patch size {patch_size}; "
            "pass encoder_kwargs={'patch_size': ...} with a divisor of image_size"
        )
    model: nn.Module = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=image_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
    )
    return model


def check_encoder(encoder: nn.Module, image_size: int) -> int:
    """Check that ``encoder`` maps ``(2, 3, image_size, image_size)`` to ``(2, num_features)``.

    Returns:
        ``num_features``.

    Raises:
        TypeError: the encoder has no integer ``num_features``.
        ValueError: the encoder cannot take images of ``image_size`` or returns another shape.
    """
    num_features = getattr(encoder, "num_features", None)
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
        hint = ""
        if isinstance(getattr(encoder, "fc", None), nn.Linear):
            fc = getattr(encoder, "fc")
            hint = (f"; for a torchvision ResNet set `encoder.fc = nn.Identity()` and "
                    f"`encoder.num_features = {fc.in_features}` (or pass encoder='resnet18')")
        raise TypeError(
            "encoder must have a positive integer attribute `num_features` (the size of the "
            f"features it returns); {type(encoder).__name__} has num_features={num_features!r}{hint}"
        )
    parameter = next(encoder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    try:
        with eval_mode(encoder), torch.no_grad():
            out = encoder(torch.zeros(2, 3, image_size, image_size, device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - any failure means the size is not accepted
        raise ValueError(
            f"encoder {type(encoder).__name__} cannot take images of image_size={image_size}: {error}"
        ) from error
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_features):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        # timm models have num_features but end in their classifier unless made without one
        hint = "; for a timm model, create it with num_classes=0" if hasattr(encoder, "reset_classifier") else ""
        raise ValueError(
            f"encoder must map (B, 3, H, W) to (B, num_features={num_features}); "
            f"at image_size={image_size} it returned {shape}{hint}"
        )
    return num_features
