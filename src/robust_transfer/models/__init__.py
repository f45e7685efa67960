"""Encoders (small CNN, 1-Lipschitz CNN, ResNet-18), the pretraining classifier, checkpoints."""

from ..errors import CheckpointError
from .checkpoint import load_checkpoint, load_encoder, save_checkpoint
from .encoders import Classifier, Encoder, ResNet18, SmallCNN
from .lipschitz import AOLConv2d, AOLLinear, LipschitzCNN, MaxMin
from .registry import ARCHITECTURES, build_encoder

__all__ = [
    "ARCHITECTURES",
    "AOLConv2d",
    "AOLLinear",
    "CheckpointError",
    "Classifier",
    "Encoder",
    "LipschitzCNN",
    "MaxMin",
    "ResNet18",
    "SmallCNN",
    "build_encoder",
    "load_checkpoint",
    "load_encoder",
    "save_checkpoint",
]
