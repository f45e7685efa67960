"""What an adaptation is: its protocol (what trains), its adversary (what it trains
against) and the settings of both, checked where they are made."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from enum import StrEnum

from ..core.checks import (
    EPOCHS,
    STEPS,
    check_number,
    check_positive_int,
    check_seed,
    parse_choice,
)
from ..core.errors import InputError
from ..theory.threat import ThreatModel


class AdaptProtocol(StrEnum):
    LINEAR_PROBE = "linear-probe"
    CERTIFIED_PROBE = "certified-probe"
    FINETUNE = "finetune"
    LP_FT = "lp-ft"
    ANCHORED_FINETUNE = "anchored-finetune"
    PARTIAL_FINETUNE = "partial-finetune"
    BITFIT = "bitfit"
    LORA = "lora"


PROBES = (AdaptProtocol.LINEAR_PROBE, AdaptProtocol.CERTIFIED_PROBE)


class Adversary(StrEnum):
    """What a head (and a fine-tuned encoder) trains against."""

    NONE = "none"
    PGD = "pgd"
    TRADES = "trades"


class NormStats(StrEnum):
    """The batch-norm statistics fine-tuning trains with."""

    ADAPTIVE = "adaptive"  # the batch's, as plain training does (running statistics move)
    FROZEN = "frozen"  # the pretrained running statistics throughout
    TWINS = "twins"  # the mean of the losses under both (TWINS)


class Recipe(StrEnum):
    """The adversarial recipes the advice chooses among (:mod:`.advice`)."""

    ADVERSARIAL_PROBE = "adversarial-probe"
    ROLI = "roli"
    ADVERSARIAL_FINETUNE = "adversarial-finetune"


@dataclass(frozen=True)
class AdaptConfig:
    """One adaptation. ``weight_decay`` is the probes' penalty on ``||W||_F^2``;
    ``anchor_weight`` is the lambda of feature-anchored fine-tuning; ``radius`` the
    certified probe's feature-space radius. ``adversary``, ``threat``,
    ``attack_steps``, ``trades_beta`` and ``eps_warmup`` set adversarial training (see
    the module); an adversarial head first trains ``probe_epochs`` epochs with Adam at
    ``probe_lr`` on the frozen encoder, from the clean probe's solution."""

    protocol: AdaptProtocol
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    weight_decay: float = 1e-4
    anchor_weight: float = 1.0
    trainable_stages: int = 1
    radius: float | None = None
    robust_weight: float = 0.5
    adversary: Adversary = Adversary.NONE
    threat: ThreatModel | None = None
    attack_steps: int = 5
    trades_beta: float = 6.0
    eps_warmup: float = 0.0
    norm_stats: NormStats = NormStats.ADAPTIVE
    probe_epochs: int = 3
    probe_lr: float = 1e-2
    lora_rank: int = 4

    def __post_init__(self) -> None:
        protocol = parse_choice(AdaptProtocol, self.protocol, "protocol")
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "adversary", parse_choice(Adversary, self.adversary, "adversary"))
        norm_stats = parse_choice(NormStats, self.norm_stats, "norm_stats")
        object.__setattr__(self, "norm_stats", norm_stats)
        check_positive_int(self.attack_steps, "attack_steps", STEPS)
        check_positive_int(self.probe_epochs, "probe_epochs", EPOCHS)
        check_positive_int(self.lora_rank, "lora_rank")
        check_number(self.probe_lr, "probe_lr")
        check_number(self.trades_beta, "trades_beta", inclusive=True)
        if not 0.0 <= check_number(self.eps_warmup, "eps_warmup", inclusive=True) < 1.0:
            raise InputError(f"eps_warmup must lie in [0, 1), got {self.eps_warmup!r}")
        if self.adversarial:
            if not isinstance(self.threat, ThreatModel):
                raise InputError(
                    f"adversary {self.adversary.value!r} trains against a threat model: give threat"
                )
            if protocol is AdaptProtocol.CERTIFIED_PROBE:
                raise InputError("the certified probe trains on its bound, not against an attack")
        elif self.eps_warmup:
            raise InputError("eps_warmup ramps an adversary's eps: give adversary too")
        elif self.threat is not None:
            raise InputError(
                "threat is read only by adversarial adaptation (adversary = pgd or trades)"
            )
        if protocol is AdaptProtocol.LORA and importlib.util.find_spec("peft") is None:
            raise InputError("protocol 'lora' needs peft: pip install 'robust-transfer[peft]'")
        if norm_stats is not NormStats.ADAPTIVE and protocol in PROBES:
            raise InputError(
                f"norm_stats {norm_stats.value!r} is a fine-tuning setting; probes keep "
                "the encoder as it is"
            )
        check_positive_int(self.epochs, "epochs", EPOCHS)
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.trainable_stages, "trainable_stages")
        check_seed(self.seed)
        check_number(self.lr, "lr")
        for name in ("weight_decay", "anchor_weight"):
            check_number(getattr(self, name), name, inclusive=True)
        if not check_number(self.robust_weight, "robust_weight") <= 1.0:
            raise InputError(f"robust_weight must lie in (0, 1], got {self.robust_weight!r}")
        if self.protocol is AdaptProtocol.CERTIFIED_PROBE:
            if self.radius is None:
                raise InputError("the certified probe needs a radius")
            check_number(self.radius, "radius", inclusive=True)

    @property
    def adversarial(self) -> bool:
        return self.adversary is not Adversary.NONE

    @property
    def recipe(self) -> Recipe | None:
        """The adversarial recipe this is, if it is one the advice names."""
        if not self.adversarial:
            return None
        return {
            AdaptProtocol.LINEAR_PROBE: Recipe.ADVERSARIAL_PROBE,
            AdaptProtocol.LP_FT: Recipe.ROLI,
            AdaptProtocol.FINETUNE: Recipe.ADVERSARIAL_FINETUNE,
        }.get(self.protocol)

    def to_dict(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values |= {
            "protocol": self.protocol.value,
            "adversary": self.adversary.value,
            "norm_stats": self.norm_stats.value,
            "threat": None
            if self.threat is None
            else {"norm": self.threat.norm.value, "eps": self.threat.eps},
        }
        return values
