"""The pipeline spec: top-level settings plus a mapping of named steps, and its validation."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator

from . import contracts, sweep, variants
from .base import Section, StepSpec
from .errors import Problem, SpecError, did_you_mean
from .loader import Document, apply_overrides, parse_file
from .resources import TrainerSpec, resource_problems, resources_for
from .steps import STEP_SPECS

KINDS = [typing.get_args(s.model_fields["kind"].annotation)[0] for s in STEP_SPECS]
# A tagged union even with one kind, so an unknown kind reads the same however many kinds exist.
Step = Annotated[Union[STEP_SPECS], Field(discriminator="kind")]


class TrackingSpec(Section):
    """Where MLflow records runs."""

    uri: str | None = None
    """Tracking URI (`http://host:5000`, `sqlite:///path.db`); default: MLFLOW_TRACKING_URI, else a sqlite
    store under the workdir."""
    experiment: str | None = None
    """Experiment name; default: the pipeline's name."""


class PipelineSpec(Section):
    """A whole pipeline: settings shared by all steps, and the steps themselves."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Pipeline name: names the MLflow experiment and the run folder."""
    description: str = ""
    """What this pipeline is for."""
    seed: int = Field(0, ge=0)
    """Seed for every random choice; same spec and seed give the same metrics on CPU."""
    workdir: str = "runs"
    """Artifacts root, relative to the spec file's folder."""
    tracking: TrackingSpec = TrackingSpec()
    """MLflow tracking settings."""
    trainer: TrainerSpec = TrainerSpec()
    """Lightning settings and devices for every step; a step's own `trainer:` changes some of them."""
    max_parallel: int = Field(2, ge=1, le=256)
    """Steps that may run at the same time when their inputs are ready. 2: the usual branch is an evaluation
    beside a fine-tune, and on a laptop more CPU steps at once slow each other about as much as they gain;
    GPU steps are also bounded by their device claims, so raise it on machines with many GPUs."""
    trust_remote_code: list[Annotated[str, Field(pattern=r"^(hf:|\./|\.\./|/)")]] = []
    """External models (`hf:ID`, `./path`, `/path`, as the steps write them) allowed to run the Python code they
    ship (`auto_map` in their config.json) when they load. Empty: llmcycle runs no model's own code."""
    steps: dict[str, Step] = Field(min_length=1)  # type: ignore[valid-type]
    """The steps, by name; `kind` picks each step's schema, references between steps form the DAG."""

    @field_validator("steps", mode="before")
    @classmethod
    def _step_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str) or not key.replace("_", "a").replace("-", "a").isalnum():
                    raise ValueError(f"step name '{key}' must use letters, digits, '_' and '-'")
        return value

    _variants: dict[str, sweep.Variant] = PrivateAttr(default_factory=dict)  # variant name -> Variant

    def register_variant(self, variant: sweep.Variant) -> None:
        self._variants[variant.name] = variant

    def variant(self, name: str) -> sweep.Variant | None:
        """The sweep variant step `name` is (None: a step as the file writes it)."""
        return self._variants.get(name)

    def swept(self, name: str) -> list[str]:
        """The names of step `name`'s variants ([]: it has no sweep)."""
        return [v for v, variant in self._variants.items() if variant.base == name]


@dataclass
class LoadedSpec:
    """A validated pipeline and the source it came from."""

    spec: PipelineSpec
    doc: Document
    path: Path
    overrides: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def workdir(self) -> Path:
        return (self.base_dir / self.spec.workdir).resolve()

    def resources(self, name: str) -> TrainerSpec:
        """The trainer settings step `name` runs with: the pipeline's, changed by the step's own."""
        step = self.spec.steps[name]
        return resources_for(self.spec.trainer, step.trainer, type(step).trains)

    def redacted(self) -> dict:
        """The resolved spec with every `${env:...}` value put back as written (never the secret)."""
        data = self.spec.model_dump(mode="json")
        secrets = dict(self.doc.secrets)
        for path, text in self.doc.secrets.items():  # a variant holds its step's secrets, where it keeps them
            for name in self.spec.swept(path[1]) if len(path) > 2 and path[0] == "steps" else []:
                if not any(path[2:2 + len(p.split("."))] == tuple(p.split(".")) for p in self.spec.variant(name).sets):
                    secrets[("steps", name) + path[2:]] = text
        for path, text in secrets.items():
            node = data
            try:
                for part in path[:-1]:
                    node = node[part]
                if path[-1] in node if isinstance(node, dict) else path[-1] < len(node):
                    node[path[-1]] = text
            except (KeyError, IndexError, TypeError):
                continue
        return data


def load(path: str | Path, overrides: list[str] | None = None) -> LoadedSpec:
    """Parse, override and validate a spec file; raise SpecError with every problem found."""
    doc = parse_file(path)
    apply_overrides(doc, list(overrides or []))
    spec, problems = _validate(doc)
    problems = doc.problems + problems
    if spec is None or problems:
        raise SpecError(problems)
    return LoadedSpec(spec=spec, doc=doc, path=Path(path).resolve(), overrides=tuple(overrides or ()))


def _validate(doc: Document) -> tuple[PipelineSpec | None, list[Problem]]:
    variants.splice(doc, TypeAdapter(Step), dict(zip(KINDS, STEP_SPECS)))  # all_variants lists name every variant
    try:
        spec = PipelineSpec.model_validate(doc.data)
    except ValidationError as err:
        problems = [_problem(doc, e) for e in err.errors()]
        return None, problems + _reference_problems(doc, _steps_that_validate(doc))
    implied = variants.expand(spec, doc)  # the variants join the steps; what follows checks them too
    implied += contracts.fill_implied(spec, doc)
    problems = _reference_problems(doc, spec.steps, spec)
    if not problems:  # contracts read the DAG; a broken reference is reported first
        problems += contracts.gate_problems(spec, doc) + contracts.tokenizer_problems(spec, doc) + \
            contracts.attention_problems(spec, doc)
    return spec, implied + problems + _resource_problems(doc, spec)


def _resource_problems(doc: Document, spec: PipelineSpec) -> list[Problem]:
    """Trainer settings valid alone but not once a step's own are merged over the pipeline's, and step settings
    that the merged trainer rules out."""
    problems = []
    for name, step in spec.steps.items():
        merged = resources_for(spec.trainer, step.trainer, type(step).trains)
        for path, message in resource_problems(step.trainer, merged, type(step).trains):
            where = ("trainer",) + path[1:] if path[0] == "pipeline" else ("steps", name, "trainer") + path
            problems.append(doc.problem(where, message))  # a pipeline-level problem is reported once
        problems += [doc.problem(("steps", name) + path, message) for path, message in step.trainer_problems(merged)]
    return problems


def _steps_that_validate(doc: Document) -> dict[str, StepSpec]:
    raw = doc.data.get("steps") if isinstance(doc.data, dict) else None
    if not isinstance(raw, dict):
        return {}
    adapter, good = TypeAdapter(Step), {}
    for name, body in raw.items():
        try:
            good[name] = adapter.validate_python(body)
        except ValidationError:
            good[name] = None  # exists, so references to it are fine
    return good


def _reference_problems(doc: Document, steps: dict[str, StepSpec | None], spec: PipelineSpec | None = None) -> list[Problem]:
    problems, edges = [], {name: [] for name in steps}
    swept = spec.swept if spec is not None else lambda name: []
    for name, step in steps.items():
        if step is None:
            continue
        edges[name] += [(v, ("steps", name, "sweep")) for v in swept(name)]  # a swept step reads its variants
        for path, target, ref in step.step_references():
            where = ("steps", name) + tuple(path)
            if target not in steps:
                problems.append(doc.problem(where, f"no step named '{target}'{did_you_mean(target, steps)}"
                                            + (" (external models are written hf:ID, ./path, /path or "
                                               "models:/name@alias)" if ref.external else "")))
            elif steps[target] is not None and (found := contracts.output_problem(doc, where, target, steps, ref,
                                                                                          step.reads_heldout(tuple(path), ref))):
                problems.append(found)
            elif swept(target) and steps[target].sweep.chooser() is None:
                names = swept(target)
                problems.append(doc.problem(where, f"step '{target}' is swept into {len(names)} variants "
                                            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); add "
                                            "sweep.select to pick one by a metric, or reference one variant by name"))
            elif not swept(name):  # a swept step's references are its variants' (checked above all the same)
                edges[name].append((target, where))
    return problems + _cycle_problems(doc, edges)


def _cycle_problems(doc: Document, edges: dict[str, list]) -> list[Problem]:
    state: dict[str, int] = {}
    problems: list[Problem] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target, where in edges.get(node, []):
            if state.get(target) == 1:
                loop = trail[trail.index(target):] + [node, target] if target in trail else [node, target]
                problems.append(doc.problem(where, "dependency cycle: " + " -> ".join(dict.fromkeys(loop[:-1]))
                                            + f" -> {target}"))
            elif target not in state:
                visit(target, trail + [node])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [])
    return problems


def _problem(doc: Document, error: dict) -> Problem:
    loc, kind, data_path = error["loc"], error["type"], _data_path(doc.data, error["loc"])
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1], doc.data)
        return doc.problem(data_path, f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], allowed)}"
                           + (f"; expected one of: {', '.join(allowed)}" if allowed else ""), key=True)
    if kind == "union_tag_invalid":
        tag = error["ctx"]["tag"]
        return doc.problem(data_path + ("kind",), f"unknown kind '{tag}'{did_you_mean(tag, KINDS)}; "
                           f"expected one of: {', '.join(KINDS)}")
    if kind == "union_tag_not_found":
        return doc.problem(data_path, f"missing 'kind'; expected one of: {', '.join(KINDS)}")
    if kind == "missing":
        return doc.problem(data_path, f"missing required field '{loc[-1]}'")
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if kind == "literal_error" and isinstance(value, str):
        message += did_you_mean(value, re.findall(r"'([^']*)'", error["ctx"]["expected"]))
    if data_path in doc.secrets:  # never echo a resolved secret; show what the file says instead
        if isinstance(value, str) and value:
            message = message.replace(value, doc.secrets[data_path])
        message += f", got {doc.secrets[data_path]}"
    elif isinstance(value, (str, int, float, bool)) and kind not in ("value_error", "assertion_error"):
        message += f", got {json.dumps(value)}"
    return doc.problem(data_path, message)


def _data_path(data: Any, loc: tuple) -> tuple:
    """Map a pydantic error location onto the data, dropping union tags and validator labels."""
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and node.get("kind") == part:
            continue
        elif isinstance(part, str) and ("[" in part or part in KINDS):
            continue
        else:
            path.append(part)
            node = None
    return tuple(path)


def _fields_at(loc: tuple, data: Any) -> list[str]:
    """Return the field names the schema accepts at loc (for "did you mean")."""
    types: list[Any] = [PipelineSpec]
    for part in loc:
        nxt: list[Any] = []
        for tp in types:
            for t in _unwrap(tp):
                if isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
                elif typing.get_origin(t) is dict:
                    nxt.append(typing.get_args(t)[1])
                elif typing.get_origin(t) in (list, tuple) and isinstance(part, int):
                    nxt.append(typing.get_args(t)[0])
                elif isinstance(t, type) and issubclass(t, BaseModel) and "kind" in t.model_fields:
                    if part in typing.get_args(t.model_fields["kind"].annotation):
                        nxt.append(t)
        types = nxt
    names: list[str] = []
    for tp in types:
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, BaseModel):
                own = vars(t).get("__annotations__", {})  # the class's own fields first, then inherited ones
                names += [n for n in sorted(t.model_fields, key=lambda n: n not in own) if n not in names]
    common = [n for n in names if n in StepSpec.model_fields]  # trainer, run_on: every kind has them, list last
    return [n for n in names if n not in common] + common


def _unwrap(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is Union or str(origin) == "types.UnionType" or type(tp).__name__ == "UnionType":
        return [u for a in typing.get_args(tp) for u in _unwrap(a)]
    return [tp]


def json_schema() -> dict:
    """The JSON Schema of a pipeline spec, for editors."""
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llmcycle pipeline"
    return schema


def step_order(spec: PipelineSpec) -> list[str]:
    """Return step names in dependency order, keeping the file's order among independent steps."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for target in dependencies(spec, name):
            visit(target)
        done.append(name)

    for name in spec.steps:
        visit(name)
    return done


def dependencies(spec: PipelineSpec, name: str) -> list[str]:
    """Return the names of the steps that `name` reads from, directly: a swept step's are its variants (it picks
    one), and each trial of a search also waits for the one before (it asks the study after that one told it)."""
    if spec.swept(name):
        return spec.swept(name)
    deps = list(dict.fromkeys(target for _, target, _ in spec.steps[name].step_references()))
    variant = spec.variant(name)
    if variant is not None and variant.trial:
        deps.append(sweep.variant_name(variant.base, f"trial={variant.trial - 1}"))
    return deps

