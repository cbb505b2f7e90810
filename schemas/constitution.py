"""The constitution file the `constitutional` step reads: principles and optional few-shot transcripts.

Parsed with the spec loader, so a mistake is reported as FILE:LINE:COL like a spec error. The step
checks its constitution when it starts (before loading any model): the pipeline schema validates
fields without knowing the spec file's folder, so a relative path cannot be resolved there.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from .base import Section
from .errors import SpecError, did_you_mean
from .loader import Document, parse_file


class Principle(Section):
    """One principle: how to ask for a critique, for a revision, and which of two replies is better."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    """Short identifier (shown in logs and tables)."""
    critique: str = Field(min_length=1)
    """Critique request appended after the assistant's reply."""
    revision: str = Field(min_length=1)
    """Revision request appended after the critique."""
    comparison: str = Field(min_length=1)
    """Multiple-choice question for the feedback model, e.g. "Which reply is more polite?"."""


class RoundExample(Section):
    """One critique/revision round of a few-shot transcript."""

    principle: str
    """Name of the principle this round applies."""
    critique: str = Field(min_length=1)
    """The example critique."""
    revision: str = Field(min_length=1)
    """The example revision."""


class Transcript(Section):
    """A worked example showing the format: prompt, reply, then critique/revision rounds."""

    prompt: str = Field(min_length=1)
    """The human turn."""
    response: str = Field(min_length=1)
    """The first assistant reply."""
    rounds: list[RoundExample] = Field(min_length=1)
    """Critique/revision rounds, in order."""


class Constitution(Section):
    """A list of principles and optional few-shot transcripts."""

    principles: list[Principle] = Field(min_length=1)
    """The principles; one is drawn uniformly at random for every critique round and comparison."""
    examples: list[Transcript] = []
    """Few-shot transcripts; the step prepends `few_shot` of them to every critique context."""

    @field_validator("principles")
    @classmethod
    def _unique_names(cls, value: list[Principle]) -> list[Principle]:
        seen = set()
        for p in value:
            if p.name in seen:
                raise ValueError(f"principle name '{p.name}' is used twice; names must be unique")
            seen.add(p.name)
        return value

    @model_validator(mode="after")
    def _known_principles(self) -> "Constitution":
        names = [p.name for p in self.principles]
        for t in self.examples:
            for r in t.rounds:
                if r.principle not in names:
                    raise ValueError(f"example round names principle '{r.principle}', which is not defined"
                                     f"{did_you_mean(r.principle, names)}; expected one of: {', '.join(names)}")
        return self

    def principle(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)


def load_constitution(path: str | Path) -> Constitution:
    """Parse and validate a constitution file; raise SpecError naming FILE:LINE:COL of every mistake."""
    doc = parse_file(path)
    try:
        constitution = Constitution.model_validate(doc.data)
    except ValidationError as err:
        raise SpecError(doc.problems + [_problem(doc, e) for e in err.errors()]) from None
    if doc.problems:
        raise SpecError(doc.problems)
    return constitution


def _problem(doc: Document, error: dict):
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("[")))
    if error["type"] == "extra_forbidden":
        owner = _owner(loc[:-1])
        allowed = list(owner.model_fields) if owner else []
        return doc.problem(loc, f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], allowed)}; expected one of: "
                           f"{', '.join(allowed)}", key=True)
    if error["type"] == "missing":
        return doc.problem(loc[:-1], f"missing required field '{loc[-1]}'")
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, (str, int, float, bool)) and error["type"] != "value_error":
        message += f", got {json.dumps(value)}"
    return doc.problem(loc, message)


def _owner(loc: tuple):
    """The model class that holds the key at loc (for "did you mean")."""
    model = Constitution
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        inner = getattr(field.annotation, "__args__", (field.annotation,))[0]
        model = inner if isinstance(inner, type) and issubclass(inner, Section) else None
        if model is None:
            return None
    return model


__all__ = ["Constitution", "Principle", "SpecError", "Transcript", "load_constitution"]
