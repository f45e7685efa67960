"""What the single-step commands share: the runtime, the encoder and the training data
the options name."""

from __future__ import annotations

import argparse

from torch import nn

from ..core.checks import check_two_classes
from ..core.errors import InputError
from ..core.runtime import Runtime
from ..data.dataset import ImageDataset
from ..data.sources import load_split
from ..data.tasks import Split, stratified_sample
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


def check_held_out(args: argparse.Namespace) -> None:
    """Refuse held-out data that is the training data, before any work."""
    if args.test_data == args.data:
        raise InputError("--test-data names the training data: the held-out accuracy would lie")


def training_split(args: argparse.Namespace) -> tuple[ImageDataset, Split]:
    """At most ``--n`` training points of ``--data`` (a seeded stratified sample, two
    classes at least) and the split they came from."""
    split = load_split(args.data, args.test_data)
    train = stratified_sample(split.train, args.n, seed=args.seed)
    check_two_classes(train.y, f"the training labels of {train.name}")
    return train, split
