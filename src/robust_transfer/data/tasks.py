"""Named transfer tasks: a pretraining split and a downstream split, each train / test.

The test part of every split is held out with a fixed seed and is never used for
training, neither of the encoder nor of the head, so that robust accuracy and the
bounds are measured on points no model has seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from robust_transfer.data.builtin import load_mnist, load_sklearn_digits
from robust_transfer.data.dataset import ImageDataset
from robust_transfer.data.dsprites import render_dsprites

from ..core.errors import DataError

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True, eq=False)
class Split:
    """A training part and a held-out test part of one data set."""

    train: ImageDataset
    test: ImageDataset

    def __post_init__(self) -> None:
        train, test = self.train, self.test
        if train.classes != test.classes:
            raise DataError(f"train and test classes differ: {train.classes} vs {test.classes}")
        if train.image_shape != test.image_shape:
            raise DataError(
                f"train and test image shapes differ: {train.image_shape} vs {test.image_shape}"
            )
        if train.target_names != test.target_names:
            raise DataError(
                f"train and test target names differ: {train.target_names} vs {test.target_names}"
            )


@dataclass(frozen=True, eq=False, kw_only=True)
class Task:
    """An encoder is pretrained on ``pretrain`` (if given), then a head is fit on
    ``downstream``. ``pretrain`` is None for tasks meant for encoders trained elsewhere.
    """

    name: str
    description: str
    pretrain: Split | None
    downstream: Split

    def __post_init__(self) -> None:
        if self.pretrain is None:
            return
        pretrain_shape = self.pretrain.train.image_shape
        downstream_shape = self.downstream.train.image_shape
        if pretrain_shape != downstream_shape:
            raise DataError(
                f"task {self.name!r}: one encoder reads both splits, but pretraining images "
                f"are {pretrain_shape} and downstream images {downstream_shape}"
            )


def stratified_split(
    data: ImageDataset, *, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> Split:
    """Hold out ``test_fraction`` of every class, chosen with ``seed``.

    Both parts come in one seeded, shuffled order: sources are often sorted by class,
    and "the first N test points" must be a fair sample of all classes, the same on
    every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(data), dtype=torch.bool)
    for label in range(data.num_classes):
        members = (data.y == label).nonzero().squeeze(1)
        shuffled = members[torch.randperm(len(members), generator=generator)]
        is_test[shuffled[: round(len(members) * test_fraction)]] = True
    if bool(is_test.all()) or not bool(is_test.any()):
        raise DataError(
            f"{data.name}: {len(data)} items are too few to split with "
            f"test_fraction={test_fraction}"
        )
    order = torch.randperm(len(data), generator=generator)
    return Split(
        train=data.subset(order[~is_test[order]], name=f"{data.name}/train"),
        test=data.subset(order[is_test[order]], name=f"{data.name}/test"),
    )


def stratified_sample(data: ImageDataset, n: int, *, seed: int = SPLIT_SEED) -> ImageDataset:
    """``n`` items (all if fewer) in a seeded, shuffled order in which every prefix holds
    each class in proportion to its size: "the first N points" of a class-sorted source
    would be one class."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    labels = data.y[order]
    position = torch.zeros(len(data), dtype=torch.float64)
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().squeeze(1)
        position[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    chosen = order[torch.argsort(position, stable=True)[: min(n, len(data))]]
    return data.subset(chosen, name=data.name)


TaskBuilder = Callable[[], Task]

_MNIST_LOW = range(0, 5)
_MNIST_HIGH = range(5, 10)
_DSPRITES_PRETRAIN_N, _DSPRITES_PRETRAIN_SEED = 5000, 1
_DSPRITES_DOWNSTREAM_N, _DSPRITES_DOWNSTREAM_SEED = 3000, 2


def _mnist_low_split() -> Split:
    low = load_mnist().select_classes(_MNIST_LOW, name="mnist-0-4")
    return stratified_split(low)


def _mnist_5_9() -> Task:
    high = load_mnist().select_classes(_MNIST_HIGH, name="mnist-5-9")
    return Task(
        name="mnist-5-9",
        description="pretrain on MNIST digits 0-4; downstream MNIST digits 5-9 as labels 0-4",
        pretrain=_mnist_low_split(),
        downstream=stratified_split(high),
    )


def _digits8x8_5_9() -> Task:
    high = load_sklearn_digits().select_classes(_MNIST_HIGH, name="digits8x8-5-9")
    return Task(
        name="digits8x8-5-9",
        description=(
            "pretrain on MNIST digits 0-4; downstream scikit-learn 8x8 digits 5-9, "
            "upsampled to 28x28, as labels 0-4 (new classes and a domain shift)"
        ),
        pretrain=_mnist_low_split(),
        downstream=stratified_split(high),
    )


def _dsprites_pretrain() -> Split:
    return stratified_split(render_dsprites(_DSPRITES_PRETRAIN_N, seed=_DSPRITES_PRETRAIN_SEED))


def _dsprites_downstream() -> Split:
    return stratified_split(render_dsprites(_DSPRITES_DOWNSTREAM_N, seed=_DSPRITES_DOWNSTREAM_SEED))


def _dsprites_shape() -> Task:
    return Task(
        name="dsprites-shape",
        description=(
            "pretrain on dSprites shape classification; downstream shape classification "
            "on freshly drawn images"
        ),
        pretrain=_dsprites_pretrain(),
        downstream=_dsprites_downstream(),
    )


def _dsprites_latents() -> Task:
    return Task(
        name="dsprites-latents",
        description=(
            "pretrain on dSprites shape classification; downstream regression of the "
            "latents (scale, orientation, position x, position y) in `targets`"
        ),
        pretrain=_dsprites_pretrain(),
        downstream=_dsprites_downstream(),
    )


_REGISTRY: dict[str, TaskBuilder] = {
    "mnist-5-9": _mnist_5_9,
    "digits8x8-5-9": _digits8x8_5_9,
    "dsprites-shape": _dsprites_shape,
    "dsprites-latents": _dsprites_latents,
}


def task_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_task(name: str) -> Task:
    """Build the task registered as ``name``; the same name always gives the same tensors."""
    builder = _REGISTRY.get(name)
    if builder is None:
        raise DataError(f"unknown task {name!r}: expected one of {', '.join(task_names())}")
    task = builder()
    if task.name != name:
        raise DataError(f"the builder registered as {name!r} made a task named {task.name!r}")
    return task


def register_task(name: str, builder: TaskBuilder, *, replace: bool = False) -> None:
    """Make ``get_task(name)`` call ``builder``, e.g. for a split of a user's own data."""
    if name in _REGISTRY and not replace:
        raise DataError(f"task {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = builder
