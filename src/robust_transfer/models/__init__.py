"""Encoders (small CNN, 1-Lipschitz CNN and SLL network, ResNet-18), the pretraining
classifier, checkpoints."""

from ..core.errors import CheckpointError
from .checkpoint import load_checkpoint, save_checkpoint
from .encoders import Classifier, Encoder, ResNet18, SmallCNN
from .heads import head_arrays, head_from_arrays, load_head
from .lipschitz import AOLConv2d, AOLLinear, LipschitzCNN, MaxMin, SLLConv2d, SLLNet
from .registry import ARCHITECTURES, build_encoder
from .specs import LoadedEncoder, load_encoder, resolve_encoder, resolve_spec, source_name

__all__ = [
    "ARCHITECTURES",
    "AOLConv2d",
    "AOLLinear",
    "CheckpointError",
    "Classifier",
    "Encoder",
    "LipschitzCNN",
    "LoadedEncoder",
    "MaxMin",
    "ResNet18",
    "SLLConv2d",
    "SLLNet",
    "SmallCNN",
    "build_encoder",
    "head_arrays",
    "head_from_arrays",
    "load_checkpoint",
    "load_encoder",
    "load_head",
    "resolve_encoder",
    "resolve_spec",
    "save_checkpoint",
    "source_name",
]
