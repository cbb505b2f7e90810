"""What a component's `run(spec, ctx)` receives and returns.

The engine builds a StepContext per step: where to write (a temporary folder renamed into place when
`run` returns), where to keep resumable checkpoints, the upstream steps' results, and the step's
MLflow run. Components return a StepOutput: relative paths of what they wrote, and their metrics.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from components.lib.phases import charged
from schemas.base import is_external
from schemas.resources import TrainerSpec


@dataclass
class StepOutput:
    """What a component hands back: output name -> path relative to its folder, and metrics."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # small JSON facts for downstream steps; `effort`: see effort()


def effort(examples: int | None = None, of: str = "", labels: int | None = None,
           tokens: int | None = None) -> dict[str, Any]:
    """The `effort` entry of a StepOutput's info, for the run's ledger (flows/ledger.py): `examples` the step
    trained on, counted once each (`of`: what they are: pairs, prompts, rollouts), `labels` preference labels
    it produced, `tokens` it processed without a model (a tokenizer's output). What its models computed the
    engine adds itself (components/lib/meter.py)."""
    out = {"examples": examples, "examples_of": of if examples is not None else None, "labels": labels,
           "tokens": tokens}
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class StepResult:
    """A completed step as downstream steps see it (read back from its result.json)."""

    name: str
    kind: str
    fingerprint: str
    dir: Path
    outputs: dict[str, str]
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    reused: bool = field(default=False, compare=False)  # this run found it complete (not in result.json)

    def path(self, key: str) -> Path:
        """Absolute path of output `key`; a clear error when the step has no such output."""
        if key not in self.outputs:
            raise KeyError(f"step '{self.name}' ({self.kind}) has no '{key}' output; it has: "
                           f"{', '.join(self.outputs) or 'none'}")
        return self.dir / self.outputs[key]

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint,
                "outputs": self.outputs, "metrics": self.metrics, "info": self.info}

    @classmethod
    def read(cls, folder: Path) -> "StepResult":
        data = json.loads((folder / "result.json").read_text())
        return cls(dir=folder, name=data["name"], kind=data["kind"], fingerprint=data["fingerprint"],
                   outputs=data["outputs"], metrics=data["metrics"], info=data.get("info", {}))


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep the numeric, finite metrics (MLflow and JSON reject NaN)."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


@dataclass
class StepContext:
    """Everything a component needs besides its own spec."""

    name: str
    kind: str
    fingerprint: str
    out_dir: Path
    ckpt_dir: Path
    base_dir: Path
    workdir: Path
    seed: int
    trainer: TrainerSpec
    upstream: dict[str, StepResult]
    pipeline_name: str = "pipeline"
    run_id: str | None = None
    tracking_uri: str | None = None
    trial: dict | None = None  # the Optuna trial a sweep's trial reports to, for pruning (components/lib/trials.py)

    @property
    def is_main(self) -> bool:
        """Whether this process speaks for the step: global rank 0 (the only process, outside torchrun)."""
        return int(os.environ.get("RANK", "0")) == 0

    # -- paths and references -----------------------------------------------------------------

    def resolve_path(self, path: str | os.PathLike) -> Path:
        """Resolve a path written in the spec (relative to the spec file's folder)."""
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def step(self, name: str) -> StepResult:
        if name not in self.upstream:
            raise KeyError(f"step '{self.name}' reads '{name}', which has no result")
        return self.upstream[name]

    def model_source(self, ref: str) -> str:
        """Turn a model reference into something `from_pretrained` takes (a folder or a hub id)."""
        if not is_external(ref):
            return str(self.step(ref).path("model"))
        if ref.startswith("hf:"):
            return ref[3:]
        if ref.startswith("models:/"):
            from components.lib.registry import download_registered

            return str(download_registered(ref, self.workdir / ".models", self.tracking_uri))
        return str(self.resolve_path(ref))

    # -- MLflow ---------------------------------------------------------------------------------

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    @charged("logging")  # the ledger's split of the step's time (components/lib/phases.py)
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in finite_metrics(metrics).items()]
        for i in range(0, len(batch), 500):
            self._client().log_batch(self.run_id, metrics=batch[i:i + 500])

    @charged("logging")
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            p = Path(path)
            (self._client().log_artifacts if p.is_dir() else self._client().log_artifact)(
                self.run_id, str(p), artifact_path)

    @charged("logging")
    def log_table(self, rows: Iterable[dict], file: str) -> None:
        """Log rows as an MLflow table artifact (shown as a table in the UI's artifact view)."""
        if self.run_id is None:
            return
        import pandas as pd

        self._client().log_table(self.run_id, data=pd.DataFrame(list(rows)), artifact_file=file)

    @charged("logging")
    def log_figure(self, figure, file: str) -> None:
        if self.run_id is not None:
            self._client().log_figure(self.run_id, figure, file)

    @charged("logging")
    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id is not None:
            for k, v in tags.items():
                self._client().set_tag(self.run_id, k, str(v))
