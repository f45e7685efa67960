"""A zoo encoder: torchvision, timm, RobustBench or open_clip, by name.

    python examples/zoo_encoder.py --encoder robustbench:Sehwag2021Proxy_R18:cifar10:Linf
    python examples/zoo_encoder.py --encoder torchvision:resnet50:IMAGENET1K_V2
    python examples/zoo_encoder.py --encoder timm:vit_small_patch16_224.augreg_in21k

Weights are fetched by the zoo package's own code where there is a network (RobustBench
looks in ``--model-dir``, timm and torchvision in their caches). The features are the
penultimate layer's, pooled; inputs are resized to the encoder's own input size (224 px
for ImageNet models: slow on a CPU, see ``--points``) and grey digits repeated over RGB.
"""

from __future__ import annotations

import argparse

import robust_transfer as rt
from robust_transfer.data import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="robustbench:Sehwag2021Proxy_R18:cifar10:Linf")
    parser.add_argument("--model-dir", default="models", help="where RobustBench keeps weights")
    parser.add_argument("--points", type=int, default=100, help="evaluation points")
    parser.add_argument("--train-points", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20, help="steps of every attack")
    args = parser.parse_args()

    options = {"model_dir": args.model_dir} if args.encoder.startswith("robustbench:") else {}
    encoder = rt.load_encoder(args.encoder, resize=True, **options)
    task = get_task("mnist-5-9")  # grey digits: the zoo adapter repeats them over RGB
    train, test = task.downstream.train, task.downstream.test
    n = args.train_points
    head = rt.train_linear_probe(rt.extract_features(encoder, train.x[:n]), train.y[:n])
    settings = rt.AttackSettings(steps=args.steps, representation_steps=args.steps)
    threats = ["Linf:1/255", "L2:0.1"]
    measured = rt.measure(encoder, test.x[: args.points], threats, settings=settings)
    print(measured.evaluate(head, test.y[: args.points], attack=True))


if __name__ == "__main__":
    main()
