"""A study's price before its work: per stage, its points, its passes through each
encoder and the expected wall time and peak memory (:mod:`.pricing` computes them), and
the budget a run is held to. ``robust-transfer plan`` prints it; ``--budget`` refuses a
run that it says would take longer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..core.errors import RobustTransferError
from ..core.schema import Record
from .calibration import Calibration
from .cost import Passes
from .spec import StudyConfig


class BudgetError(RobustTransferError):
    """A study the plan says would take longer than the budget it was given."""

    # Its own status: a script can tell "over budget" from a bad config.
    exit_code = 3


@dataclass(frozen=True)
class Stage:
    """A stage's work on one encoder: ``seconds`` of wall time, ``memory`` bytes beyond
    what the study holds throughout (data, encoders)."""

    name: str
    encoder: str
    points: int
    passes: Passes
    seconds: float
    memory: float
    # Seconds when the stage works on every point it might (the refinement: on all of
    # them, not the share the pilot measured or the plan assumed).
    most_seconds: float


@dataclass
class Forecast:
    """Every stage of a study, priced on this machine."""

    units: int
    stages: list[Stage]
    calibrations: dict[str, Calibration]
    baseline: float
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def most_seconds(self) -> float:
        return sum(stage.most_seconds for stage in self.stages)

    @property
    def peak(self) -> float:
        return self.baseline + max((stage.memory for stage in self.stages), default=0.0)

    def rows(self) -> list[Record]:
        """One row per stage and encoder, in the order the study runs them."""
        merged: dict[tuple[str, str], list[Stage]] = {}
        for stage in self.stages:
            merged.setdefault((stage.name, stage.encoder), []).append(stage)
        return [
            {
                "stage": name,
                "encoder": encoder,
                "points": sum(s.points for s in parts),
                "forward": round(sum(s.passes.forward * s.points for s in parts)),
                "backward": round(sum(s.passes.backward * s.points for s in parts)),
                "seconds": sum(s.seconds for s in parts),
                "memory_mb": round(max(s.memory for s in parts) / 2**20),
            }
            for (name, encoder), parts in merged.items()
        ]

    def to_dict(self) -> dict[str, object]:
        return {
            "units": self.units,
            "seconds": self.seconds,
            "most_seconds": self.most_seconds,
            "peak_bytes": self.peak,
            "baseline_bytes": self.baseline,
            "device": self.device,
            "stages": self.rows(),
            "calibrations": {
                name: asdict(calibration) for name, calibration in self.calibrations.items()
            },
            "notes": self.notes,
        }


def parse_budget(value: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m`` or ``2h``."""
    text = value.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"a budget is seconds or a number with s, m or h, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a budget must be positive and finite, got {value!r}")
    return seconds


def check_budget(forecast: Forecast, budget: float) -> None:
    if forecast.seconds > budget:
        raise BudgetError(
            f"the plan expects {duration(forecast.seconds)}, over the budget of "
            f"{duration(budget)}: fewer points (eval_points, train_points, radius_points), "
            "steps or threats, a GPU, or --force to run anyway"
        )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Ledger:
    """The stages of a plan as :mod:`.pricing` finds them, each priced by its encoder's
    calibration."""

    config: StudyConfig
    calibrations: dict[str, Calibration]
    stages: list[Stage] = field(default_factory=list)
    seen: set[tuple[object, ...]] = field(default_factory=set)

    def add(
        self,
        name: str,
        encoder: str,
        points: int,
        passes: Passes,
        *,
        total: bool = False,
        batch: int | None = None,
        extra_seconds: float = 0.0,
        extra_memory: float = 0.0,
        key: tuple[object, ...] | None = None,
        most: Passes | None = None,
    ) -> None:
        """A stage of ``passes`` per point (``total``: over all ``points``), once per
        ``key`` (work the study stores and shares); ``most`` passes per point at most,
        where the share of points it works on is measured on a few only."""
        if key is not None:
            if key in self.seen:
                return
            self.seen.add(key)
        if total:
            passes = passes * (1 / points)
        c = self.calibrations[encoder]
        batch = min(points, batch or c.batch)
        seconds = points * c.seconds(passes.forward, passes.backward) + extra_seconds
        # A backward pass keeps every layer's activations; a forward pass alone, about
        # its largest layer's input and output; training a probe on features, neither.
        per_image = c.activation_bytes if passes.backward else c.forward_bytes
        memory = extra_memory
        if passes.forward or passes.backward:
            memory += c.batch_bytes + batch * per_image
        most = passes if most is None else most * (1 / points if total else 1.0)
        most_seconds = points * c.seconds(most.forward, most.backward) + extra_seconds
        self.stages.append(Stage(name, encoder, points, passes, seconds, memory, most_seconds))
