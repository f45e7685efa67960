"""Adaptation protocols that put a head on a pretrained representation."""

from .linear_probe import train_linear_probe

__all__ = ["train_linear_probe"]
