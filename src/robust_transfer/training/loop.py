"""The one training loop of pretraining and fine-tuning: Adam over seeded shuffled
mini-batches, optionally with a one-cycle learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.dataset import ImageDataset

# (inputs, labels, the loop's generator for any randomness of the loss) -> mean batch loss
BatchLoss = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def train_epochs(
    module: nn.Module,
    parameters: Iterable[nn.Parameter],
    data: ImageDataset,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    one_cycle: bool,
    desc: str,
    progress: bool,
) -> float:
    """Train ``parameters`` on ``data`` with ``module`` in train mode (eval mode after);
    the last batch's loss. The shuffling and the loss's randomness come from one
    generator seeded with ``seed``: the same arguments give the same weights."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    steps = epochs * -(-len(data) // batch_size)
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps) if one_cycle else None
    )
    last = float("nan")
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            index = order[start : start + batch_size]
            x, y = data.x[index].to(device), data.y[index].to(device)
            value = batch_loss(x, y, generator)
            optimizer.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if schedule is not None:
                schedule.step()
            last = float(value.detach())
            bar.update()
            bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    module.eval()
    return last
