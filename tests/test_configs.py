"""The paper's settings in ``configs/``: every file parses, names encoders RobustBench
has, reaches each task's images through the encoder (sizes and channels the encoder
resizes), and states its radii in pixel units around the model's training radius."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import robustbench_architecture
from torch import nn

from robust_transfer.data.tasks import get_task
from robust_transfer.models.specs import resolve_encoder
from robust_transfer.models.zoo import _robustbench
from robust_transfer.study.config import load_config
from robust_transfer.study.spec import StudyConfig, TaskSpec

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
# The models' training radius in pixel units (Linf): CIFAR 8/255, ImageNet 4/255.
TRAINING_EPS = {
    "cifar10": Fraction(8, 255),
    "cifar100": Fraction(8, 255),
    "imagenet": Fraction(4, 255),
}
_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "fashion-mnist": (1, 28, 28)}


def _image_shape(task: TaskSpec) -> tuple[int, ...]:
    """The shape of the task's images, read from its specs (nothing downloaded)."""
    if task.data is None:
        return get_task(task.name).downstream.train.image_shape
    prefix, _, rest = task.data.partition(":")
    if prefix == "torchvision":
        return _SHAPES[rest.partition(":")[0]]
    assert prefix == "folder", task.data
    size = task.data_options.get("size", 64)
    assert isinstance(size, int)
    return (3, size, size)


def test_the_paper_configs_are_there() -> None:
    assert {path.stem for path in CONFIGS} >= {"paper-cifar100-wrn34", "paper-imagenet-wrn50"}


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_loads_its_encoders_and_reaches_every_task(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config: StudyConfig = load_config(path)
    utils = _robustbench()
    # The weights file is the one thing that needs the network: build the architecture.
    monkeypatch.setattr(
        utils,
        "load_model",
        lambda model_name, model_dir, dataset, threat_model: robustbench_architecture(
            model_name, dataset, threat_model
        ),
    )
    for spec in config.encoders.values():
        source = str(spec.source)
        prefix, name, dataset, threat = source.split(":")
        assert prefix == "robustbench"
        encoder = resolve_encoder(source, **spec.options).module
        reference = robustbench_architecture(name, dataset, threat)
        width = [m for m in reference.modules() if isinstance(m, nn.Linear)][-1].in_features
        for task in config.tasks:
            if spec.name not in task.encoders:
                continue
            with torch.no_grad():
                features = encoder(torch.rand(2, *_image_shape(task)))
            assert features.shape == (2, width), (task.name, spec.name)
            radii = {Fraction(t.eps).limit_denominator(1000) for t in task.threats}
            assert all(t.norm.value == threat for t in task.threats)
            assert max(radii) == TRAINING_EPS[dataset], task.name
