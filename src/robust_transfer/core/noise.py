"""Random numbers drawn per sample from ``(seed, stream, sample id)``.

An attack's random start for a sample must not depend on the batch the sample falls in,
on how many samples are still attacked at a restart, or on how the data is split
between processes. So each sample gets its own generator, seeded by a hash of its
coordinates; the numbers are drawn on the CPU (the same bits whatever the device) and
moved to the batch's device. The Python loop runs once per sample and random start,
never per attack step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError


def _sample_seed(seed: int, stream: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{stream}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class SampleNoise:
    """Random numbers for the samples ``ids`` (one row each) under ``seed``.

    ``stream`` separates independent uses for the same samples (e.g. one per restart).
    """

    seed: int
    ids: Tensor

    def __post_init__(self) -> None:
        if self.seed < 0 or self.ids.dim() != 1 or self.ids.is_floating_point():
            raise InputError("SampleNoise needs a non-negative seed and 1-D integer sample ids")
        if self.ids.numel() and int(self.ids.min()) < 0:
            raise InputError("sample ids must be non-negative")

    @classmethod
    def first(cls, seed: int, n: int) -> SampleNoise:
        """Noise for the samples ``0 .. n-1``."""
        return cls(seed, torch.arange(n))

    def subset(self, rows: Tensor) -> SampleNoise:
        return SampleNoise(self.seed, self.ids[rows.cpu()])

    def _draw(self, shape: tuple[int, ...], stream: int, like: Tensor, normal: bool) -> Tensor:
        generator = torch.Generator()
        rows = []
        for sample in self.ids.tolist():
            generator.manual_seed(_sample_seed(self.seed, stream, sample))
            draw = torch.randn if normal else torch.rand
            rows.append(draw(shape, generator=generator, dtype=like.dtype))
        out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=like.dtype)
        return out.to(like.device)

    def uniform(self, shape: tuple[int, ...], *, stream: int, like: Tensor) -> Tensor:
        """``(len(ids), *shape)`` uniform on ``[0, 1)``, with ``like``'s dtype and device."""
        return self._draw(shape, stream, like, normal=False)

    def normal(self, shape: tuple[int, ...], *, stream: int, like: Tensor) -> Tensor:
        """``(len(ids), *shape)`` standard normal, with ``like``'s dtype and device."""
        return self._draw(shape, stream, like, normal=True)
