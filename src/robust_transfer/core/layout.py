"""Tensors laid out as torch allocates them.

CPU kernels (matrix products, vectorised sums) take different paths, and round
differently, on data that does not start at the allocator's alignment or is not
contiguous. Tensors that safetensors or numpy hand out can lie at any byte offset, so
one computation gave another last bit on a stored array than on a fresh one, and an
iterative fit (L-BFGS on a flat objective) turned that bit into another head.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch's CPU allocator aligns every block to 64 bytes.
ALIGNMENT = 64


def aligned(value: Tensor) -> Tensor:
    """``value`` itself when it is contiguous and starts at the allocator's alignment;
    otherwise a contiguous copy (which does)."""
    if value.is_contiguous() and value.data_ptr() % ALIGNMENT == 0:
        return value
    return value.clone(memory_format=torch.contiguous_format)
