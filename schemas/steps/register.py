"""`register`: put a model in the MLflow Model Registry; move `champion` only when a gate on metrics passes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Iterator, Literal

from pydantic import AfterValidator, Field

from ..base import GenerativeModelRef, Ref, Section, StepName, StepSpec

OPERATORS = ("<=", ">=", "==", "!=", "<", ">")
_METRIC = r"[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z0-9_./@:-]+"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OPERAND = re.compile(rf"^\s*(?:(?P<metric>{_METRIC})\s*(?:(?P<op>[-+*])\s*(?P<k>{_NUMBER}))?|(?P<num>{_NUMBER}))\s*$")


@dataclass(frozen=True)
class Operand:
    """A side of a condition: `step.metric`, optionally `+ k`, `- k` or `* k`, or a number."""

    step: str | None = None
    metric: str | None = None
    op: str | None = None
    k: float = 0.0
    number: float | None = None

    def __str__(self) -> str:
        if self.step is None:
            return f"{self.number:g}"
        return f"{self.step}.{self.metric}" + (f" {self.op} {self.k:g}" if self.op else "")


@dataclass(frozen=True)
class Condition:
    """`left OP right`, parsed from text such as `ppo.true_reward > sft.true_reward + 0.1`."""

    left: Operand
    op: str
    right: Operand
    text: str

    def steps(self) -> list[str]:
        return [o.step for o in (self.left, self.right) if o.step is not None]


def parse_operand(text: str) -> Operand:
    m = _OPERAND.match(text)
    if m is None:
        raise ValueError(f"'{text.strip()}' is neither a number nor STEP.METRIC (e.g. base_eval.val/perplexity), "
                         "optionally followed by + k, - k or * k")
    if m["num"] is not None:
        return Operand(number=float(m["num"]))
    step, metric = m["metric"].split(".", 1)
    return Operand(step=step, metric=metric, op=m["op"], k=float(m["k"]) if m["k"] else 0.0)


def parse_condition(text: str) -> Condition:
    """Parse one gate condition; a mistake raises ValueError saying what was expected."""
    for op in OPERATORS:
        left, found, right = text.partition(op)
        if found:
            if right.lstrip()[:1] in ("<", ">", "=", "!") or left.rstrip()[-1:] in ("=", "!"):
                raise ValueError(f"condition '{text}': unknown comparison; expected one of {', '.join(OPERATORS)}")
            if any(o in right for o in OPERATORS):
                raise ValueError(f"condition '{text}' has more than one comparison; write one per list item")
            return Condition(parse_operand(left), op, parse_operand(right), text.strip())
    raise ValueError(f"condition '{text}' has no comparison; expected LEFT OP RIGHT with OP one of "
                     f"{', '.join(OPERATORS)} (e.g. 'base_eval.val/perplexity < 40')")


def _check_condition(text: str) -> str:
    parse_condition(text)
    return text


def _check_metric(text: str) -> str:
    operand = parse_operand(text)
    if operand.step is None or operand.op:
        raise ValueError(f"expected STEP.METRIC (e.g. base_eval.val/perplexity), got '{text}'")
    return text


ConditionText = Annotated[str, AfterValidator(_check_condition)]
MetricName = Annotated[str, AfterValidator(_check_metric)]


class BeatChampion(Section):
    """Promote only if this model beats the current champion on a metric (no champion yet: passes)."""

    metric: MetricName
    """STEP.METRIC measured for this model; the champion's value is the same key among its version tags."""
    by: float = Field(0.0, ge=0)
    """Smallest improvement that counts (in the metric's units)."""
    mode: Literal["min", "max"]
    """`min`: lower is better (loss, perplexity); `max`: higher is better (reward, accuracy)."""


class RegisterSpec(StepSpec):
    """Register a model version (transformers flavor, tokenizer included); move aliases by the gate."""

    produces: ClassVar[frozenset[str]] = frozenset()

    kind: Literal["register"]
    model: GenerativeModelRef
    """The model to register (a causal LM or an encoder-decoder); a peft adapter folder is merged into its base
    first."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registered model name in the MLflow Model Registry."""
    alias: StepName = "champion"
    """Alias that moves to the new version only when the gate passes (`candidate` always moves)."""
    gate: list[ConditionText] = []
    """Conditions on upstream metrics that must all hold, e.g. `base_eval.val/perplexity < 40`."""
    beat_champion: BeatChampion | None = None
    """Also require beating the version that holds `alias` now on one metric."""
    evidence: list[StepName] = []
    """Steps whose metrics are attached to the version as tags (gate metrics are always attached)."""
    on_fail: Literal["stop", "continue"] = "stop"
    """When the gate fails: `stop` fails this step (the pipeline stops), `continue` lets it finish."""
    description: str = ""
    """Description of the new model version."""

    def conditions(self) -> list[Condition]:
        return [parse_condition(text) for text in self.gate]

    def step_references(self) -> Iterator[tuple[tuple, str, Ref]]:
        yield from super().step_references()
        any_step = Ref("*")
        for i, condition in enumerate(self.conditions()):
            for step in condition.steps():
                yield ("gate", i), step, any_step
        if self.beat_champion is not None:
            yield ("beat_champion", "metric"), parse_operand(self.beat_champion.metric).step, any_step
        for i, step in enumerate(self.evidence):
            yield ("evidence", i), step, any_step

    def plan_details(self) -> dict[str, str]:
        details = {"registers": f"{self.name} (candidate; {self.alias} if the gate passes)"}
        if self.gate:
            details["gate"] = " and ".join(self.gate)
        if self.beat_champion is not None:
            b = self.beat_champion
            details["beats"] = f"{self.alias} on {b.metric} by >= {b.by:g} ({b.mode})"
        return details
