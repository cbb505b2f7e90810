"""`compare`: put steps that ran side by side: one table of their metrics, one figure of their held-out curves."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import Ref, StepSpec

MetricName = Annotated[str, Field(pattern=r"^[a-z0-9_]+(/[a-z0-9_]+)+$")]


class CompareSpec(StepSpec):
    """Read other steps' results (nothing re-runs) into one table and one figure, logged to MLflow."""

    produces: ClassVar[frozenset[str]] = frozenset({"report"})

    kind: Literal["compare"]
    steps: list[Annotated[str, Ref("*")]] = Field(min_length=2)
    """The steps to compare, in the table's order."""
    metrics: list[MetricName] = Field(["val/perplexity", "perf/tokens_per_s", "params/total"], min_length=1)
    """The table's columns: metrics every compared step reports (schemas/metrics.py)."""
    curve: Literal["val/loss", "none"] = "val/loss"
    """`val/loss`: draw the held-out loss curve each step recorded during training (pretrain's) on one figure;
    `none`: the table only."""

    @model_validator(mode="after")
    def _distinct(self) -> "CompareSpec":
        for field in ("steps", "metrics"):
            values = getattr(self, field)
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{field} names {', '.join(twice)} twice")
        return self
