"""Fingerprints through a DAG: a change reaches the step and everything downstream, nothing else.

Two small kinds declared here give the DAG depth whatever kinds are registered; the plan code is
generic over kinds, so this is the code `llmcycle plan` and `run` use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import pytest
from pydantic import Field

from flows.plan import UsageError, make_plan
from schemas.base import ModelRef, StepSpec, TokenizerRef
from schemas.loader import apply_overrides, parse_file
from schemas.pipeline import LoadedSpec, PipelineSpec
from schemas.steps.tokenize import TokenizeSpec


class TrainSpec(StepSpec):
    produces: ClassVar[frozenset[str]] = frozenset({"model"})
    kind: Literal["train"]
    tokenizer: TokenizerRef
    steps: int = 10
    api_key: str = ""


class GenerateSpec(StepSpec):
    produces: ClassVar[frozenset[str]] = frozenset({"data"})
    kind: Literal["generate"]
    model: ModelRef
    samples: int = 4


Kinds = Annotated[Union[TokenizeSpec, TrainSpec, GenerateSpec], Field(discriminator="kind")]


class Pipeline(PipelineSpec):
    steps: dict[str, Kinds]  # type: ignore[assignment]


SPEC = """\
name: dag
workdir: work
steps:
  tok: {kind: tokenize, corpus: {builtin: pydoc}}
  other: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 300}
  base: {kind: train, tokenizer: tok, api_key: "${env:LLMCYCLE_TEST_KEY}"}
  gen: {kind: generate, model: base}
"""


def load(path: Path, overrides: list[str] | None = None) -> LoadedSpec:
    doc = parse_file(path)
    apply_overrides(doc, overrides or [])
    assert not doc.problems, doc.problems
    return LoadedSpec(spec=Pipeline.model_validate(doc.data), doc=doc, path=path.resolve())


def prints(path: Path, overrides: list[str] | None = None, **options) -> dict[str, str]:
    return {p.name: p.fingerprint for p in make_plan(load(path, overrides), **options)}


@pytest.fixture
def spec(write_spec, monkeypatch) -> Path:
    monkeypatch.setenv("LLMCYCLE_TEST_KEY", "s3cr3t-value")
    return write_spec(SPEC)


def test_order_and_dependencies(spec):
    plan = make_plan(load(spec))
    assert [(p.name, p.deps) for p in plan] == [("tok", []), ("other", []), ("base", ["tok"]), ("gen", ["base"])]
    assert all(p.output_dir == spec.parent / "work" / p.name / p.fingerprint[:12] for p in plan)


@pytest.mark.parametrize("override, changed", [
    ("steps.tok.vocab_size=4096", {"tok", "base", "gen"}),
    ("steps.base.steps=20", {"base", "gen"}),
    ("steps.gen.samples=8", {"gen"}),
    ("steps.other.algorithm=unigram", {"other"}),
    ("seed=1", {"tok", "other", "base", "gen"}),
    ("description=words", set()),
])
def test_a_change_reaches_downstream_only(spec, override, changed):
    before, after = prints(spec), prints(spec, [override])
    assert {name for name in before if before[name] != after[name]} == changed


def test_only_selects_a_step_and_what_it_needs_and_force_marks_one(spec):
    plan = {p.name: p for p in make_plan(load(spec), only=["base"], force=["tok"])}
    assert {n for n, p in plan.items() if p.selected} == {"tok", "base"}
    assert {n for n, p in plan.items() if p.forced} == {"tok"}
    assert {n for n, p in plan.items() if p.will_run} == {"tok", "base"}
    with pytest.raises(UsageError, match="no step named 'bsae'"):
        make_plan(load(spec), only=["bsae"])


def test_complete_output_is_cached(spec):
    plan = {p.name: p for p in make_plan(load(spec))}
    plan["tok"].output_dir.mkdir(parents=True)
    (plan["tok"].output_dir / "result.json").write_text("{}")  # not what a step writes
    assert make_plan(load(spec))[0].to_json()["action"] == "run"
    (plan["tok"].output_dir / "result.json").write_text(json.dumps(
        {"name": "tok", "kind": "tokenize", "fingerprint": plan["tok"].fingerprint, "outputs": {}, "metrics": {}}))
    assert {p.name: p.to_json()["action"] for p in make_plan(load(spec))} == \
        {"tok": "cached", "other": "run", "base": "run", "gen": "run"}


def test_secret_values_stay_out_of_the_plan(spec, monkeypatch):
    loaded = load(spec)
    assert loaded.spec.steps["base"].api_key == "s3cr3t-value"
    plan = make_plan(loaded)
    assert "s3cr3t-value" not in json.dumps([p.to_json() for p in plan])
    monkeypatch.setenv("LLMCYCLE_TEST_KEY", "another-value")  # rotating a secret reuses the outputs
    assert prints(spec) == {p.name: p.fingerprint for p in plan}
