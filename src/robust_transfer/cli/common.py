"""What the single-step commands share: the runtime and the encoder the options name."""

from __future__ import annotations

import argparse

from torch import nn

from ..core.runtime import Runtime
from ..models import load_encoder


def runtime_of(args: argparse.Namespace) -> Runtime:
    return Runtime.detect(args.device)


def encoder_of(args: argparse.Namespace, runtime: Runtime) -> nn.Module:
    encoder = load_encoder(
        args.encoder,
        args.checkpoint,
        layer=args.layer,
        resize=args.resize,
        trust_checkpoint=args.trust_checkpoint,
        trust_code=args.trust_code,
        seed=args.seed,
    )
    return encoder.to(runtime.device).eval()
