"""The study's encoders: pretrained into the cache or loaded from their specs on first
use, then kept for the rest of the run, with what is known of each written beside the
results."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..certify.lipschitz import proven_lipschitz
from ..core.atomic import atomic_write_text
from ..core.errors import ConfigError
from ..core.runtime import Runtime
from ..core.schema import Field, Meta
from ..data.tasks import get_task
from ..models import resolve_encoder
from ..training.pretrain import cached_pretrain
from .spec import EncoderSpec, StudyConfig

Log = Callable[[str], None]


@dataclass
class Encoders:
    """Encoders built on first use, then kept for the rest of the run."""

    config: StudyConfig
    cache_dir: Path
    info_dir: Path
    runtime: Runtime
    progress: bool
    log: Log
    built: dict[str, tuple[nn.Module, dict[str, object]]] = dataclasses.field(default_factory=dict)

    def get(self, name: str) -> tuple[nn.Module, dict[str, object]]:
        if name not in self.built:
            encoder, info = self._build(self.config.encoders[name])
            if self.runtime.rank == 0:
                atomic_write_text(
                    self.info_dir / f"{name}.json", json.dumps(info, indent=2, default=str)
                )
            self.built[name] = (encoder, info)
        return self.built[name]

    def info(self, name: str) -> dict[str, object]:
        """What is known of an encoder, also when a resumed run never had to build it."""
        path = self.info_dir / f"{name}.json"
        if name not in self.built and path.is_file():
            loaded: dict[str, object] = json.loads(path.read_text())
            return loaded
        return self.built[name][1] if name in self.built else {}

    def _build(self, spec: EncoderSpec) -> tuple[nn.Module, dict[str, object]]:
        info: dict[str, object] = {Meta.PRETRAINING: spec.pretraining}
        if spec.pretrain is not None and spec.pretrain_task is not None:
            self.log(f"encoder {spec.name}: {spec.pretrain.protocol.value} pretraining")
            pretrain = get_task(spec.pretrain_task).pretrain
            if pretrain is None:
                raise ConfigError(f"task {spec.pretrain_task!r} has no pretraining split")
            result = cached_pretrain(
                spec.pretrain,
                pretrain.train,
                self.cache_dir,
                runtime=self.runtime,
                progress=self.progress,
            )
            encoder: nn.Module = result.encoder
            info |= {
                Meta.PRETRAIN_TASK: spec.pretrain_task,
                Meta.PRETRAIN_CONFIG: spec.pretrain.to_dict(),
                Meta.PRETRAIN_METRICS: result.metrics,
                Meta.PRETRAIN_SECONDS: result.seconds,
            }
        else:
            loaded = resolve_encoder(str(spec.source), seed=self.config.seed, **spec.options)
            encoder = loaded.module
            info |= loaded.info
        info[Field.LIPSCHITZ_L2] = proven_lipschitz(encoder)
        return encoder.to(self.runtime.device).eval(), info
