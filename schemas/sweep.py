"""Sweeps: one step run as many variants (a grid, a list, or an Optuna search), one of them chosen by a metric.

A step's `sweep:` makes variants of it, each a step of its own with its own fingerprint, output folder and MLflow
run: `base[lr=0.003,layers=4]` for a grid (the last part of each swept path, and its value), `base[small]` for a
named variant, `base[trial=0]` for the trials of a search. They join `spec.steps` just before the step, whose own
name then stands for the sweep:

- with `select`, a reference to the step's name reads the chosen variant (the engine picks it once every variant
  is complete: flows/sweeps.py), and `register` gates on `base.METRIC` read the chosen one's metrics;
- a reference that wants every variant is marked `Ref(..., all_variants=True)` (a field that reads many runs, such
  as `scaling`'s `runs`): expansion puts the variant names in the list in place of the step's name, so the
  component sees plain step names;
- any other reference to a swept step without `select` is a spec error; a variant may always be named itself.

A search's trials run one after another (each asks the study after the last one told it); their settings are
sampled when they start, so the plan knows their names, not their values. schemas/variants.py makes the variants.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .section import Section

MAX_VARIANTS = 64  # a grid is a product: three axes of four values are already 64 runs
MetricName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.@-]+)+$")]
UNSWEPT = ("kind", "sweep")  # what a variant cannot change: what it is, and that it is one variant


class SelectSpec(Section):
    """Which variant a reference to the swept step reads."""

    metric: MetricName
    """A metric every variant reports (schemas/metrics.py lists each kind's), e.g. `val/perplexity`."""
    mode: Literal["min", "max"]
    """`min`: the lowest value wins (loss, perplexity); `max`: the highest (accuracy, reward)."""


class VariantSpec(Section):
    """One named variant: the step with some fields changed."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=64)
    """The variant's name; the step it becomes is `STEP[NAME]`."""
    set: dict[str, Any] = {}
    """Fields to change, by dotted path into the step (`optimizer.lr: 0.01`); a mapping value replaces the section."""


class SpaceSpec(Section):
    """The values a search may give one field: a range (`low`, `high`) or a list of `choices`."""

    low: float | None = None
    """Smallest value of the range."""
    high: float | None = None
    """Largest value of the range."""
    log: bool = False
    """Sample the range on a log scale (learning rates); needs low > 0."""
    step: float | None = Field(None, gt=0)
    """Spacing of the values in the range (an integer field's values are whole numbers whatever it is)."""
    choices: list[Any] | None = Field(None, min_length=1)
    """The values to choose from (instead of a range)."""

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SpaceSpec":
        ranged = self.low is not None or self.high is not None
        if (self.choices is not None) == ranged:
            raise ValueError("give a range (low and high) or choices, not both or neither")
        if ranged and (self.low is None or self.high is None):
            raise ValueError("a range needs both low and high")
        if ranged and self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and (self.choices is not None or self.low <= 0):
            raise ValueError("log needs a range with low > 0")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both (Optuna samples a log range continuously)")
        return self


class PruningSpec(Section):
    """Stop a trial early when it does worse than the earlier trials did at the same step (Optuna's MedianPruner)."""

    metric: MetricName = "val/loss"
    """The metric the step logs at each validation round of its Lightning loop, reported to the trial as it trains
    (a kind without validation rounds reports none, and no trial is pruned)."""
    n_startup_trials: int = Field(5, ge=0)
    """Trials that always run to the end before any is pruned (Optuna's default)."""
    n_warmup_steps: int = Field(0, ge=0)
    """Training steps of a trial before it may be pruned."""


class OptunaSpec(Section):
    """An Optuna study: how many trials, how they are sampled, and what they minimise or maximise."""

    n_trials: int = Field(ge=1)
    """Trials to run, one after another; raising it later resumes the study (finished trials are kept)."""
    sampler: Literal["tpe", "random"] = "tpe"
    """`tpe`: Optuna's TPESampler (random for its first 10 trials, then guided); `random`: RandomSampler."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether the study minimises or maximises `metric`."""
    metric: MetricName
    """The trials' objective: a metric the step reports at its end (e.g. `val/loss`)."""
    pruning: PruningSpec | None = None
    """Stop unpromising trials early on a metric logged during training (null: every trial runs to the end)."""


class SearchSpec(Section):
    """A search over the step's fields."""

    optuna: OptunaSpec
    """The study's settings."""
    space: dict[str, SpaceSpec] = Field(min_length=1)
    """The searched fields, by dotted path into the step (`optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}`)."""

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        return flatten_paths(value, leaf=lambda v: isinstance(v, dict) and set(v) <= set(SpaceSpec.model_fields))


class SweepSpec(Section):
    """Run the step as many variants: exactly one of `grid`, `variants` and `search`."""

    grid: dict[str, list[Any]] | None = None
    """Every combination of these values, by dotted path into the step: `{optimizer.lr: [1.0e-3, 3.0e-3]}`."""
    variants: list[VariantSpec] | None = Field(None, min_length=1)
    """Variants listed one by one, each with a name and the fields it changes."""
    search: SearchSpec | None = None
    """An Optuna search (its trials run one after another and pick their settings from the earlier ones)."""
    select: SelectSpec | None = None
    """Pick one variant by a metric: a reference to the step's name then reads it (a search's default: its own
    metric and direction)."""
    max_variants: int = Field(MAX_VARIANTS, ge=1, le=4096)
    """The most variants this sweep may make (a guard against a grid that multiplies out of hand)."""

    @field_validator("grid", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        return flatten_paths(value, leaf=lambda v: not isinstance(v, dict))

    @model_validator(mode="after")
    def _one_way(self) -> "SweepSpec":
        given = [n for n in ("grid", "variants", "search") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid (every combination), variants (a list) or search (optuna)"
                             + (f", not {' and '.join(given)}" if given else ""))
        for path, values in (self.grid or {}).items():
            shown = [json.dumps(v, sort_keys=True) for v in values]
            if not values:
                raise ValueError(f"grid.{path} lists no values")
            if len(set(shown)) < len(shown):
                raise ValueError(f"grid.{path} lists a value twice")
        names = [v.name for v in self.variants or []]
        if len(set(names)) < len(names):
            raise ValueError(f"variants names {', '.join(sorted({n for n in names if names.count(n) > 1}))} twice")
        if self.count() > self.max_variants:
            how = (" x ".join(str(len(v)) for v in self.grid.values()) + " = " if self.grid and len(self.grid) > 1
                   else "")
            raise ValueError(f"this sweep makes {how}{self.count()} variants, more than max_variants "
                             f"({self.max_variants}); shrink it, or raise max_variants if you mean it")
        return self

    def count(self) -> int:
        """How many variants the sweep makes."""
        if self.grid is not None:
            return math.prod(len(v) for v in self.grid.values())
        return len(self.variants) if self.variants is not None else self.search.optuna.n_trials

    def chooser(self) -> SelectSpec | None:
        """How a reference to the swept step picks its variant: `select`, else a search's own objective."""
        if self.select is not None or self.search is None:
            return self.select
        o = self.search.optuna
        return SelectSpec(metric=o.metric, mode="min" if o.direction == "minimize" else "max")

    def describe(self) -> str:
        """The sweep in a few words, for `llmcycle plan`."""
        if self.grid is not None:
            how = "grid " + " x ".join(f"{p} ({len(v)})" for p, v in self.grid.items())
        elif self.variants is not None:
            how = "variants " + ", ".join(v.name for v in self.variants)
        else:
            o = self.search.optuna
            how = f"optuna {o.sampler}, {o.direction} {o.metric}" + (
                f", median pruning on {o.pruning.metric}" if o.pruning else "") + ", trials one after another"
        pick = self.chooser()
        return (f"{self.count()} variants ({how}); " + (f"select {pick.metric} ({pick.mode})" if pick else
                "no select: downstream steps name a variant, or read them all"))


@dataclass(frozen=True)
class Variant:
    """One variant of a swept step: what it changes (`sets`: dotted path -> value; a trial's are sampled when it
    starts) and, for a search, its trial number."""

    base: str
    label: str
    sets: dict[str, Any] = field(default_factory=dict)
    trial: int | None = None

    @property
    def name(self) -> str:
        return variant_name(self.base, self.label)


def variant_name(base: str, label: str) -> str:
    return f"{base}[{label}]"


def flatten_paths(value: Any, leaf, prefix: str = "") -> Any:
    """`{optimizer: {lr: [...]}}` as `{optimizer.lr: [...]}` (what `--set steps.x.sweep.grid.optimizer.lr=...`
    writes); `leaf(v)` tells a value from a nested mapping."""
    if not isinstance(value, dict):
        return value
    out: dict = {}
    for key, item in value.items():
        path = f"{prefix}{key}"
        if leaf(item) or not isinstance(item, dict):
            out[path] = item
        else:
            out.update(flatten_paths(item, leaf, path + "."))
    return out
