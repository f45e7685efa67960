"""``robust-transfer adapt``: one adaptation protocol, clean or adversarial, on a user's
encoder and data; the adapted encoder and head written as safetensors with what they
trained against, what it cost and how they fare under attack on held-out points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from ..attacks import attack_classifier
from ..core.atomic import atomic_write, atomic_write_text
from ..core.schema import Record
from ..data.tasks import stratified_sample
from ..models.heads import save_head
from ..report.tables import text
from ..study.folder import refuse_a_file
from ..theory.threat import ThreatModel
from ..training.adapt import adapt
from ..training.advice import measure_advice
from ..training.protocols import AdaptConfig, Adversary
from ..training.wrappers import Joined
from .arguments import ADAPT_FILE, ENCODER_FILE, HEAD_FILE
from .common import check_held_out, encoder_of, runtime_of, training_split


def run_adapt(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_a_file(out)
    check_held_out(args)
    threat = ThreatModel(args.threat, args.eps)
    adversarial = args.adversary != Adversary.NONE
    config = AdaptConfig(  # checked before any work
        protocol=args.protocol,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        adversary=args.adversary,
        threat=threat if adversarial else None,
        attack_steps=args.attack_steps,
        eps_warmup=args.eps_warmup,
        norm_stats=args.norm_stats,
        lora_rank=args.lora_rank,
    )
    runtime = runtime_of(args)
    encoder = encoder_of(args, runtime)
    train, split = training_split(args)
    advice = None
    if args.advise:
        advice = measure_advice(encoder, train, threat, seed=args.seed)
        print(f"advice ({threat}): try {advice.first.value} first; {advice.reason}")
    adapted = adapt(encoder, train, config, progress=not args.quiet)
    test = stratified_sample(split.test, args.eval_points, seed=args.seed)
    model = Joined(adapted.encoder, adapted.head).eval()
    attacked = attack_classifier(
        model,
        test.x.to(runtime.device),
        test.y.to(runtime.device),
        threat,
        steps=20,
        seed=args.seed,
    )
    moved = adapted.encoder is not encoder
    record: dict[str, object] = {
        "encoder": args.encoder,
        "checkpoint": args.checkpoint,
        "data": args.data,
        "test_data": args.test_data,
        "classes": list(train.classes),
        "train_points": len(train),
        "test_points": len(test),
        "config": config.to_dict(),
        "metrics": adapted.metrics,
        "advice": None if advice is None else advice.to_dict(),
        "evaluated_against": str(threat),
        "test_acc": attacked.clean_accuracy,
        "test_robust_acc": attacked.robust_accuracy,
        "encoder_file": ENCODER_FILE if moved else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    head = save_head(adapted.head, out / HEAD_FILE, {"classes": json.dumps(record["classes"])})
    if moved:
        state = {
            k: v.detach().cpu().contiguous().clone()
            for k, v in adapted.encoder.state_dict().items()
        }
        header = {"robust_transfer": json.dumps(record["config"]), "encoder": args.encoder}
        atomic_write(out / ENCODER_FILE, lambda temp: save_file(state, temp, metadata=header))
    atomic_write_text(out / ADAPT_FILE, json.dumps(record, indent=2) + "\n")
    row: Record = {"protocol": config.protocol.value, "adversary": config.adversary.value}
    row |= {
        key: record[key] for key in ("train_points", "test_points", "test_acc", "test_robust_acc")
    }
    row["seconds"] = adapted.metrics["seconds"]
    print(text([row], [(key, key) for key in row]))
    written = [str(head), *([str(out / ENCODER_FILE)] if moved else []), str(out / ADAPT_FILE)]
    print("written: " + "\n         ".join(written))
    return 0
