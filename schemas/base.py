"""Building blocks shared by the step schemas: the step base class, references, common sections."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Iterator, Literal

from pydantic import BaseModel, Field, model_validator

from .resources import RunOnSpec, TrainerSpec
from .section import Section
from .sweep import SweepSpec

EXTERNAL_PREFIXES = ("hf:", "./", "../", "/", "models:/")


@dataclass(frozen=True)
class Ref:
    """Marks a string field as a reference to another step that must produce `output` ("*": any step).

    With `external=True` the string may instead be an external model: `hf:ID`, `./path`, `../path`,
    `/path` or `models:/name@alias`; a bare name is always a step. `causal=True`: the model must be a
    causal LM (a masked one cannot generate or be fine-tuned as one); with `seq2seq=True` too, an encoder-decoder
    (t5) also fits: it generates from a prompt as well. `heldout=True`: the field reads the
    tokenize step's held-out (`val`) split, so that step must hold documents out (`val_fraction > 0`).
    `all_variants=True` (on a list of names): a swept step's name in the list stands for all its variants, which
    take its place when the spec loads (schemas/sweep.py); any other reference to a swept step reads the variant
    its `sweep.select` chooses. `kinds`: when given, the step must be of one of these kinds (for what it reports,
    not only what it writes).
    """

    output: str
    external: bool = False
    causal: bool = False
    heldout: bool = False
    seq2seq: bool = False
    all_variants: bool = False
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Input:
    """Marks a field holding files or globs (relative to the spec) whose contents feed the step: they are part
    of its fingerprint, so editing one re-runs the step (`StepSpec.input_globs` finds every such field).

    `rows` names the files' row format, checked before the step trains (schemas/rows.py): `text` (.txt, or
    .jsonl rows with the section's `text_field`), `sft`, `prompt`, `preference`, `task`, `reference`; None: not checked
    row by row (a dataset name, a folder, a file with a schema of its own).
    """

    rows: str | None = None


InputFiles = Annotated[list[str], Input()]
InputFile = Annotated[str, Input()]
TextFiles = Annotated[list[str], Input(rows="text")]
SftFiles = Annotated[list[str], Input(rows="sft")]
PromptFiles = Annotated[list[str], Input(rows="prompt")]
PreferenceFiles = Annotated[list[str], Input(rows="preference")]
TaskFile = Annotated[str, Input(rows="task")]
ReferenceFiles = Annotated[list[str], Input(rows="reference")]
StepName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
TokenizerRef = Annotated[str, Ref("tokenizer", heldout=True)]  # with its token files, validation included
ModelRef = Annotated[str, Ref("model", external=True),
                     Field(description="A step that produced a model, or `hf:ID`, `./path`, `/path`, "
                                       "`models:/name@alias`.")]
CausalModelRef = Annotated[str, Ref("model", external=True, causal=True),
                           Field(description="A step that produced a causal LM, or `hf:ID`, `./path`, `/path`, "
                                             "`models:/name@alias`.")]
GenerativeModelRef = Annotated[str, Ref("model", external=True, causal=True, seq2seq=True),
                               Field(description="A step that produced a causal LM or an encoder-decoder (t5), or "
                                                 "`hf:ID`, `./path`, `/path`, `models:/name@alias`.")]


def is_external(value: str) -> bool:
    """Tell whether a model reference names something outside the pipeline."""
    return value.startswith(EXTERNAL_PREFIXES)


class StepSpec(Section):
    """Base of every step kind. `produces` lists every output the kind can write; `outputs()` those it writes
    with its settings (the engine checks a finished step against it)."""

    produces: ClassVar[frozenset[str]] = frozenset()
    trains: ClassVar[bool] = False  # trains with Lightning, so it may span several devices and nodes

    trainer: TrainerSpec | None = None
    """This step's changes to the pipeline's `trainer:` (devices, accelerator, strategy, precision, ...)."""
    run_on: RunOnSpec | None = None
    """Run this step on a Prefect work pool instead of beside the flow (the workdir must be shared)."""
    sweep: SweepSpec | None = None
    """Run this step as many variants (a grid, a list, an Optuna search), each a step of its own; `select` picks the
    one a reference to this step reads."""

    def step_references(self) -> Iterator[tuple[tuple, str, Ref]]:
        """Yield (field path, step name, Ref) for every reference to another step."""
        yield from _walk_refs(self, ())

    def outputs(self) -> frozenset[str]:
        """The outputs this step writes with its settings (a subset of `produces`)."""
        return self.produces

    def reads_heldout(self, path: tuple, ref: Ref) -> bool:
        """Whether the reference at `path` reads its tokenize step's held-out split with these settings."""
        return ref.heldout

    def why_no(self, output: str) -> str:
        """Why the settings rule `output` out (for the error of a step that reads it), or ""."""
        return ""

    def trainer_problems(self, trainer: TrainerSpec) -> list[tuple[tuple, str]]:
        """(field path in the step, message) for settings the trainer it runs with rules out (a GPU-only
        method on `accelerator: cpu`); `trainer` is the pipeline's merged with the step's own."""
        return []

    def checks_rows(self, field: str) -> bool:
        """Whether a bad row of the input `field` (a dotted path) stops the step before it starts; False for
        data whose bad rows the step reports instead (`monitor`). Files are checked either way."""
        return True

    def input_globs(self) -> list[str]:
        """File globs (relative to the spec file) whose contents feed this step: every `Input` field's value."""
        return list(_walk_inputs(self))


def _find_ref(annotation: Any) -> Ref | None:
    """The Ref inside an annotation, also when wrapped (`ModelRef | None`, `list[ModelRef]`)."""
    for arg in typing.get_args(annotation):
        found = arg if isinstance(arg, Ref) else _find_ref(arg)
        if found is not None:
            return found
    return None


def _walk_refs(model: BaseModel, prefix: tuple) -> Iterator[tuple[tuple, str, Ref]]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        # pydantic keeps Annotated metadata on the field only when it is the outermost type
        ref = next((m for m in info.metadata if isinstance(m, Ref)), None) or _find_ref(info.annotation)
        if ref is not None and isinstance(value, str):
            if not (ref.external and is_external(value)):
                yield prefix + (name,), value, ref
        elif isinstance(value, BaseModel):
            yield from _walk_refs(value, prefix + (name,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk_refs(item, prefix + (name, i))
                elif ref is not None and isinstance(item, str) and not (ref.external and is_external(item)):
                    yield prefix + (name, i), item, ref


def _walk_inputs(model: BaseModel) -> Iterator[str]:
    for _, patterns, _, _ in walk_inputs(model):
        yield from patterns


def walk_inputs(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, list[str], Input, BaseModel]]:
    """Yield (field path, its globs, its Input marker, the section holding it) for every input field set."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        marker = next((m for m in info.metadata if isinstance(m, Input)), None) or _find_marker(info.annotation, Input)
        if marker is not None and isinstance(value, str):
            yield prefix + name, [value], marker, model
        elif marker is not None and isinstance(value, list):
            yield prefix + name, [v for v in value if isinstance(v, str)], marker, model
        elif isinstance(value, BaseModel):
            yield from walk_inputs(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from walk_inputs(item, f"{prefix}{name}.{i}.")


def _find_marker(annotation: Any, kind: type):
    """The first `kind` marker inside an annotation (`InputFiles | None`), or None."""
    for arg in typing.get_args(annotation):
        found = arg if isinstance(arg, kind) else _find_marker(arg, kind)
        if found is not None:
            return found
    return None


class FromStep(Section):
    """Data produced by another step, e.g. `data: {step: cai}`."""

    step: Annotated[str, Ref("data")]
    """The step whose data output to use."""


# -- training sections shared by every kind that trains ----------------------------------------


class OptimizerSpec(Section):
    """Optimizer settings."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """Which torch optimizer to use."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (adamw) or L2 penalty (adam, sgd)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""


class ScheduleSpec(Section):
    """Learning-rate schedule: linear warmup then decay."""

    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to the peak learning rate."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the decay."""


class EarlyStoppingSpec(Section):
    """Stop when `val/loss` stops improving."""

    patience: int = Field(3, ge=1)
    """Validation rounds without improvement before stopping."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest decrease of val/loss that counts as an improvement."""


class TrainingLoop(Section):
    """The training-loop settings every kind that trains shares (written at the top of the step)."""

    optimizer: OptimizerSpec = OptimizerSpec()
    """Optimizer and its hyperparameters."""
    schedule: ScheduleSpec = ScheduleSpec()
    """Learning-rate schedule."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per optimizer micro-batch."""
    accumulate: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train for."""
    max_tokens: int | None = Field(None, ge=1)
    """Train until this many tokens were seen (alternative to max_steps)."""
    val_every: int = Field(50, ge=1)
    """Validate every this many optimizer steps."""
    val_batches: int = Field(8, ge=1)
    """Batches of held-out data per validation."""
    early_stopping: EarlyStoppingSpec | None = None
    """Stop early on val/loss (null: never)."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a resumable checkpoint every this many optimizer steps."""

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainingLoop":
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give max_steps or max_tokens, not both")
        return self


class TrainingStepSpec(StepSpec, TrainingLoop):
    """Base of the kinds that train with the shared loop (its settings at the top of the step)."""

    trains: ClassVar[bool] = True

    def loop(self) -> TrainingLoop:
        """This step's loop settings, as the library takes them: every TrainingLoop field, by construction."""
        return TrainingLoop.model_validate({name: getattr(self, name) for name in TrainingLoop.model_fields})


def dump_for_fingerprint(model: BaseModel) -> dict[str, Any]:
    """Dump a spec as JSON-able data for hashing and logging."""
    return model.model_dump(mode="json")
