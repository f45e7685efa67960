"""A WideResNet-34-10 for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation blocks,
640 pooled features: the architecture of the paper's CIFAR-100 encoder, for pricing its
study on a machine without RobustBench's weights (what a study costs does not depend on
the weights)::

    PYTHONPATH=benchmarks robust-transfer plan configs/paper-cifar100-wrn34.toml \\
        --stand-in wrn34-cifar100=wide_resnet:wrn_34_10
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(inputs), nn.BatchNorm2d(outputs)
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.shortcut = (
            None
            if inputs == outputs and stride == 1
            else nn.Conv2d(inputs, outputs, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """Depth ``6 n + 4``, widths 16, 160, 320, 640 for ``widen = 10``; ``channels`` of
    the input images."""

    def __init__(self, depth: int = 34, widen: int = 10, channels: int = 3) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for index in range(blocks):
                inputs = widths[stage] if index == 0 else widths[stage + 1]
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(_Block(inputs, widths[stage + 1], stride))
        self.body = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.body(x))).mean(dim=(2, 3))


def wrn_34_10() -> nn.Module:
    return WideResNet(34, 10).eval()


def wrn_16_4_grey() -> nn.Module:
    """A mid-size encoder for 28 x 28 grey digits (2.7 M weights, 256 features), between
    the default study's small CNNs and the paper's encoders."""
    return WideResNet(16, 4, channels=1).eval()
