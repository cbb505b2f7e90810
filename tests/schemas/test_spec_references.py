"""References between steps: missing steps with "did you mean", wrong outputs, cycles, order.

The checks come from `Ref` annotations, whatever the kind; these tests declare two small kinds of
their own so they hold however many real kinds are registered.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, TypeAdapter

from schemas.base import FromStep, ModelRef, StepSpec, TokenizerRef
from schemas.loader import parse_text
from schemas.pipeline import PipelineSpec, _reference_problems, dependencies, step_order
from schemas.steps.tokenize import TokenizeSpec


class TrainSpec(StepSpec):
    produces: ClassVar[frozenset[str]] = frozenset({"model"})
    kind: Literal["train"]
    tokenizer: TokenizerRef
    init: ModelRef | None = None


class GenerateSpec(StepSpec):
    produces: ClassVar[frozenset[str]] = frozenset({"data"})
    kind: Literal["generate"]
    model: ModelRef
    data: FromStep | None = None


Kinds = Annotated[Union[TokenizeSpec, TrainSpec, GenerateSpec], Field(discriminator="kind")]


class Pipeline(PipelineSpec):
    steps: dict[str, Kinds]  # type: ignore[assignment]


def check(text: str) -> list[str]:
    """Run the engine's reference checks over a spec written with the kinds above."""
    doc = parse_text(text, "p.yaml")
    steps = {name: TypeAdapter(Kinds).validate_python(body) for name, body in doc.data["steps"].items()}
    return [str(p) for p in _reference_problems(doc, steps)]


HEAD = "name: x\nsteps:\n  tok: {kind: tokenize, corpus: {builtin: pydoc}}\n"


def test_valid_references_give_no_problems():
    assert check(HEAD + "  base: {kind: train, tokenizer: tok}\n"
                        "  gen: {kind: generate, model: base}\n"
                        "  gen2: {kind: generate, model: base, data: {step: gen}}\n") == []


def test_missing_step_suggests_the_near_miss():
    assert check(HEAD + "  base: {kind: train, tokenizer: tokk}\n") == [
        "p.yaml:4:34: steps.base.tokenizer: no step named 'tokk' (did you mean 'tok'?)"]


def test_missing_model_step_mentions_external_forms():
    found = check(HEAD + "  gen:\n    kind: generate\n    model: gpt2\n")
    assert found == ["p.yaml:6:12: steps.gen.model: no step named 'gpt2' (external models are written hf:ID, "
                     "./path, /path or models:/name@alias)"]


def test_external_model_forms_are_not_steps():
    for ref in ("hf:sshleifer/tiny-gpt2", "./models/m", "../m", "/abs/m", "models:/lm@champion"):
        assert check(HEAD + f"  base: {{kind: train, tokenizer: tok, init: '{ref}'}}\n") == [], ref


def test_step_that_produces_something_else():
    found = check(HEAD + "  gen: {kind: generate, model: tok}\n")
    assert found == ["p.yaml:4:32: steps.gen.model: step 'tok' (tokenize) writes no model; it writes tokenizer, "
                     "tokens"]


def test_nested_reference_is_located():
    found = check(HEAD + "  base: {kind: train, tokenizer: tok}\n"
                         "  gen:\n    kind: generate\n    model: base\n    data: {step: gne}\n")
    assert found == ["p.yaml:8:18: steps.gen.data.step: no step named 'gne' (did you mean 'gen'?)"]


def test_longer_cycle_is_reported_once_with_its_path():
    found = check(HEAD + "  a: {kind: train, tokenizer: tok, init: c}\n"
                         "  b: {kind: train, tokenizer: tok, init: a}\n"
                         "  c: {kind: train, tokenizer: tok, init: b}\n")
    assert found == ["p.yaml:5:42: steps.b.init: dependency cycle: a -> c -> b -> a"]


def test_self_reference_is_a_cycle():
    found = check(HEAD + "  gen: {kind: generate, model: base, data: {step: gen}}\n"
                         "  base: {kind: train, tokenizer: tok}\n")
    assert found == ["p.yaml:4:51: steps.gen.data.step: dependency cycle: gen -> gen"]


def test_pure_cycle():
    found = check(HEAD + "  a: {kind: train, tokenizer: tok, init: b}\n"
                         "  b: {kind: train, tokenizer: tok, init: a}\n")
    assert found == ["p.yaml:5:42: steps.b.init: dependency cycle: a -> b -> a"]


def test_order_follows_references_and_keeps_file_order():
    doc = parse_text(HEAD.replace("  tok:", "  gen: {kind: generate, model: base}\n  tok:")
                     + "  other: {kind: tokenize, corpus: {builtin: pydoc}}\n"
                     + "  base: {kind: train, tokenizer: tok}\n", "p.yaml")
    spec = Pipeline.model_validate(doc.data)
    assert step_order(spec) == ["tok", "base", "gen", "other"]
    assert dependencies(spec, "gen") == ["base"]
