"""The one container every loader returns: images NCHW float32 in [0, 1], int64 labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.errors import DataError, InputTypeError


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image data set held in memory, checked when it is made.

    ``x`` is (N, C, H, W) float32 in [0, 1], the input box every threat model assumes;
    ``y`` is (N,) int64 with values in ``range(len(classes))``. ``targets`` are optional
    continuous targets (N, K) for regression heads, one name per column in
    ``target_names``.

    ``eq=False``: comparing tensors field by field has no single truth value, so two
    data sets are equal only when they are the same object.
    """

    x: Tensor
    y: Tensor
    name: str
    classes: tuple[str, ...]
    targets: Tensor | None = None
    target_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field, names in (("classes", self.classes), ("target_names", self.target_names)):
            if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
                raise InputTypeError(f"{self.name}: {field} must be a tuple of str, got {names!r}")
        _check_images(self.x, self.name)
        _check_labels(self.y, len(self.x), len(self.classes), self.name)
        _check_targets(self.targets, self.target_names, len(self.x), self.name)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W): what an encoder for this data has to accept."""
        c, h, w = self.x.shape[1:]
        return (c, h, w)

    def subset(self, index: Tensor | Sequence[int], *, name: str | None = None) -> ImageDataset:
        """The items at ``index`` (integer positions, or a boolean mask of length N)."""
        positions = _positions(index, len(self))
        return ImageDataset(
            x=self.x[positions],
            y=self.y[positions],
            name=self.name if name is None else name,
            classes=self.classes,
            targets=None if self.targets is None else self.targets[positions],
            target_names=self.target_names,
        )

    def select_classes(self, labels: Sequence[int], *, name: str) -> ImageDataset:
        """Keep the items whose label is in ``labels``, relabelled 0..k-1 in that order.

        This is how one source gives a pretraining task and a downstream task with
        disjoint classes, e.g. digits 5-9 become labels 0-4.
        """
        wanted = list(labels)
        if not wanted:
            raise DataError("labels must name at least one class")
        if len(set(wanted)) != len(wanted):
            raise DataError(f"labels must not repeat, got {wanted}")
        unknown = [label for label in wanted if not 0 <= label < self.num_classes]
        if unknown:
            raise DataError(
                f"labels {unknown} are not classes of {self.name!r} "
                f"(valid: 0..{self.num_classes - 1})"
            )
        # A lookup table from old label to new label, -1 for dropped classes.
        new_label = torch.full((self.num_classes,), -1, dtype=torch.int64)
        new_label[torch.tensor(wanted)] = torch.arange(len(wanted))
        mapped = new_label[self.y]
        keep = (mapped >= 0).nonzero().squeeze(1)
        return ImageDataset(
            x=self.x[keep],
            y=mapped[keep],
            name=name,
            classes=tuple(self.classes[label] for label in wanted),
            targets=None if self.targets is None else self.targets[keep],
            target_names=self.target_names,
        )


def _positions(index: Tensor | Sequence[int], length: int) -> Tensor:
    positions = torch.as_tensor(index)
    if positions.dtype == torch.bool:
        if positions.shape != (length,):
            raise DataError(
                f"a boolean mask must have shape ({length},), got {tuple(positions.shape)}"
            )
        return positions.nonzero().squeeze(1)
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if positions.dtype.is_floating_point or positions.dtype.is_complex:
        raise InputTypeError(f"index must hold integers or booleans, got {positions.dtype}")
    if positions.dim() != 1:
        raise DataError(f"index must be 1-D, got shape {tuple(positions.shape)}")
    if positions.min() < -length or positions.max() >= length:
        raise IndexError(f"index out of range for a data set of {length} items")
    return positions.to(torch.int64)


def _check_images(x: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise InputTypeError(
            f"{name}: x must be float32 with values in [0, 1], got {x.dtype} "
            "(scale uint8 images with x.float() / 255)"
        )
    if x.dim() != 4:
        raise DataError(
            f"{name}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)} "
            "(add a channel axis to grey-level images with x.unsqueeze(1))"
        )
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: x contains NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{name}: x must lie in [0, 1], got values in [{low:g}, {high:g}]")


def _check_labels(y: object, n: int, num_classes: int, name: str) -> None:
    if not isinstance(y, Tensor):
        raise InputTypeError(f"{name}: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise InputTypeError(f"{name}: y must be int64 class indices, got {y.dtype}")
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{name}: y must have shape ({n},) to match x, got {tuple(y.shape)}")
    if num_classes == 0:
        raise DataError(f"{name}: classes must name at least one class")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{name}: labels must lie in 0..{num_classes - 1} (one per class name), "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )


def _check_targets(targets: Tensor | None, names: tuple[str, ...], n: int, name: str) -> None:
    if targets is None:
        if names:
            raise DataError(f"{name}: target_names given without targets")
        return
    if not isinstance(targets, Tensor) or not targets.dtype.is_floating_point:
        raise InputTypeError(f"{name}: targets must be a floating point tensor")
    if targets.dim() != 2 or len(targets) != n:
        raise DataError(
            f"{name}: targets must have shape ({n}, K) to match x, got {tuple(targets.shape)}"
        )
    if len(names) != targets.shape[1]:
        raise DataError(f"{name}: {targets.shape[1]} target columns but {len(names)} target_names")
    if not bool(torch.isfinite(targets).all()):
        raise DataError(f"{name}: targets contain NaN or infinite values")
