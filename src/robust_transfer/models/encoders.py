"""Built-in encoders: inputs (N, C, H, W) in [0, 1] to representations (N, m).

Normalisation lives inside each encoder, so a threat model's eps is always in pixel
units of [0, 1] inputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.checks import FEATURES, check_positive_int
from ..core.errors import InputError, InputTypeError

ImageShape = tuple[int, int, int]


def _image_shape(value: object) -> ImageShape:
    shape = tuple(value) if isinstance(value, list | tuple) else ()
    if len(shape) != 3 or not all(
        isinstance(v, int) and 0 < v <= limit for v, limit in zip(shape, _MOST_SHAPE, strict=True)
    ):
        raise InputError(
            f"image_shape must be three positive integers (C, H, W), at most {_MOST_SHAPE}, "
            f"got {value!r}"
        )
    channels, height, width = shape
    return int(channels), int(height), int(width)


# Beyond any image a built-in encoder is meant for: past it, sizes are typos.
_MOST_SHAPE = (64, 4096, 4096)


class Encoder(nn.Module):
    """Base of the built-in encoders (see the class attributes for the contract)."""

    arch: ClassVar[str]
    image_shape: ImageShape
    feature_dim: int
    # A proven upper bound on the l2 -> l2 Lipschitz constant of forward() in pixel
    # units of [0, 1] inputs; None when unknown.
    lipschitz_l2: float | None = None

    def __init__(self, image_shape: ImageShape, feature_dim: int) -> None:
        super().__init__()
        self.image_shape = _image_shape(image_shape)
        self.feature_dim = check_positive_int(feature_dim, "feature_dim", FEATURES)

    def config(self) -> dict[str, object]:
        """Keyword arguments that rebuild this architecture with :func:`build_encoder`."""
        return {"image_shape": list(self.image_shape), "feature_dim": self.feature_dim}

    def stages(self) -> list[nn.Module]:
        """The parameterised stages from input to output, for partial fine-tuning."""
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise InputError(
                f"{type(self).__name__} expects inputs of shape (N, *{self.image_shape}), "
                f"got {tuple(x.shape)}"
            )


class _Normalize(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class SmallCNN(Encoder):
    """Three 3x3 conv layers (two with stride 2, three for images of 48 pixels and more)
    and a linear projection: seconds per epoch on a laptop CPU for 28x28 digits."""

    arch = "small-cnn"

    def __init__(self, image_shape: ImageShape = (1, 28, 28), feature_dim: int = 64) -> None:
        super().__init__(image_shape, feature_dim)
        channels, height, width = self.image_shape
        self.normalize = _Normalize((0.5,) * channels, (0.5,) * channels)
        first = 2 if min(height, width) >= 48 else 1
        self.conv1 = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=first, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        side_h, side_w = height, width
        for stride in (first, 2, 2):
            side_h, side_w = (side_h - 1) // stride + 1, (side_w - 1) // stride + 1
        flat = 64 * side_h * side_w
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(flat, feature_dim))

    def stages(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3, self.project]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        out: Tensor = self.project(self.conv3(self.conv2(self.conv1(self.normalize(x)))))
        return out


class _BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(Encoder):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), CIFAR-10 normalisation inside."""

    arch = "resnet18"

    def __init__(self, image_shape: ImageShape = (3, 32, 32), feature_dim: int = 512) -> None:
        super().__init__(image_shape, feature_dim)
        channels = self.image_shape[0]
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        self.normalize = _Normalize(
            mean[:channels] if channels == 3 else (0.5,) * channels,
            std[:channels] if channels == 3 else (0.25,) * channels,
        )
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        widths, layers, inputs = (64, 128, 256, 512), [], 64
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(
                nn.Sequential(_BasicBlock(inputs, width, stride), _BasicBlock(width, width, 1))
            )
            inputs = width
        self.layers = nn.ModuleList(layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project: nn.Module = (
            nn.Identity() if feature_dim == 512 else nn.Linear(512, feature_dim)
        )

    def stages(self) -> list[nn.Module]:
        tail = [] if isinstance(self.project, nn.Identity) else [self.project]
        return [self.stem, *self.layers, *tail]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        out = self.stem(self.normalize(x))
        for layer in self.layers:
            out = layer(out)
        result: Tensor = self.project(self.pool(out))
        return result


class Classifier(nn.Module):
    """An encoder and a linear head: the model supervised pretraining trains."""

    def __init__(self, encoder: Encoder | nn.Module, num_classes: int) -> None:
        super().__init__()
        dim = getattr(encoder, "feature_dim", None)
        if not isinstance(dim, int):
            raise InputTypeError("the encoder must expose an integer feature_dim")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.encoder = encoder
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out: Tensor = self.encoder(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(x))
        return out
