import os

import pytest
import torch
from torch import nn

# Under pytest-xdist each worker takes one core: two single-threaded workers beat one
# two-threaded process on a suite of mostly small tensors.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def mlp_encoder(n_in: int = 30, hidden: int = 40, out: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()


def cnn_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 12),
    ).eval()


def linear_encoder(matrix: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(matrix)
    return layer.eval()


def random_head(dim: int, classes: int, seed: int = 0, scale: float = 1.0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.mul_(scale)
    return head.eval()


def robustbench_architecture(name: str, dataset: str, threat: str) -> nn.Module:
    """A RobustBench model as its zoo builds it, with random weights (nothing downloaded)."""
    from robust_transfer.models.zoo import _robustbench

    _robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]
    model: nn.Module = entry["model"]()
    return model.eval()


def pretrained_on_digits(encoder: nn.Module, dim: int = 32) -> nn.Module:
    """``encoder`` (``dim`` features) trained for 40 Adam steps with a linear head on
    digits 0-4 (the caller seeds the generator): a small encoder with some structure, in
    eval mode, no gradients left on it."""
    import torch.nn.functional as F

    from robust_transfer.data import get_task

    split = get_task("mnist-5-9").pretrain
    assert split is not None
    head = nn.Linear(dim, 5)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    encoder.train()
    for step in range(40):
        start = (step * 100) % 2000
        x, y = split.train.x[start : start + 100], split.train.y[start : start + 100]
        optimizer.zero_grad()
        F.cross_entropy(head(encoder(x)), y).backward()
        optimizer.step()
    encoder.zero_grad(set_to_none=True)
    return encoder.eval()
