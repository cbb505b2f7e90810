"""Data sections: where a step's corpus, rows, pairs or prompts come from (shared by several kinds).

Fields holding files (globs relative to the spec) are `InputFiles`: their contents are part of the step's
fingerprint, so editing a data file re-runs the steps that read it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import (Input, InputFile, InputFiles, PreferenceFiles, PromptFiles, Ref, Section, SftFiles, TextFiles,
                   is_external)

# The builtin task mixture's tasks (components/lib/tasks.py; a test keeps the two lists equal).
BUILTIN_TASKS = ("copy", "reverse", "capitalize", "count", "larger", "add", "sentiment", "polite")
BuiltinTask = Literal[BUILTIN_TASKS]  # type: ignore[valid-type]


def one_source(section: Section, sources: tuple[str, ...], builtin_only: frozenset[str] = frozenset(),
               builtin: str = "") -> None:
    """The checks every data section shares: exactly one of `sources` given, `eval_files` only beside `files`,
    and the settings in `builtin_only` only with `builtin: <builtin>`."""
    given = [k for k in sources if getattr(section, k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(sources)} (got {', '.join(given) or 'none'})")
    if getattr(section, "eval_files", None) is not None and section.files is None:
        raise ValueError("eval_files goes with files")
    stray = builtin_only & section.model_fields_set
    if stray and section.builtin is None:
        raise ValueError(f"{', '.join(sorted(stray))} apply to builtin: {builtin} only")


class DatasetSource(Section):
    """A corpus read through the `datasets` library (a local folder works offline)."""

    path: InputFile
    """Dataset name on the hub, a loader name (`json`, `text`) or a local folder."""
    name: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the text."""
    data_files: InputFiles | None = None
    """Files for loader names such as `json` or `text`."""


class CorpusSpec(Section):
    """Where the text comes from: exactly one of `builtin`, `files` or `dataset`."""

    builtin: Literal["pydoc"] | None = None
    """A corpus that ships with Python: `pydoc` is the pydoc topics (~465 KB of English)."""
    files: TextFiles | None = None
    """Globs of .txt files (documents separated by blank lines) or .jsonl files, relative to the spec."""
    text_field: str = "text"
    """Field holding the text in .jsonl rows."""
    dataset: DatasetSource | None = None
    """A `datasets` source."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "CorpusSpec":
        one_source(self, ("builtin", "files", "dataset"))
        return self


class SftDataSpec(Section):
    """Instruction data: exactly one of `files`, `builtin` or `step`."""

    files: SftFiles | None = None
    """Globs of JSONL files (relative to the spec) with {prompt, completion} or {messages: [...]} rows."""
    eval_files: SftFiles | None = None
    """Globs of held-out JSONL files in the same formats (default: eval_fraction of the training rows)."""
    builtin: Literal["tasks"] | None = None
    """`tasks`: the project's templated task mixture, with held-out combinations for evaluation."""
    tasks: list[BuiltinTask] | None = None
    """Subset of the builtin tasks (default: all)."""
    n_per_task: int = Field(300, ge=1, le=1_000_000)
    """Builtin: training examples per task."""
    eval_per_task: int = Field(40, ge=1, le=100_000)
    """Builtin: held-out examples per task."""
    step: Annotated[str | None, Ref("data")] = None
    """A step whose data output holds `sft.jsonl`."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the rows held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt cut from the left, then the completion from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "SftDataSpec":
        one_source(self, ("files", "builtin", "step"), frozenset({"tasks", "n_per_task", "eval_per_task"}), "tasks")
        return self


class PromptDataSpec(Section):
    """Prompts to roll out from: exactly one of `files` or `builtin`; held-out prompts measure the result."""

    files: PromptFiles | None = None
    """Globs of JSONL files with rows {prompt, ...} (or chat `messages`); other fields reach reward functions."""
    eval_files: PromptFiles | None = None
    """Globs of held-out JSONL prompt files; default: hold out `eval_fraction` of the rows."""
    builtin: Literal["tasks"] | None = None
    """`tasks`: the prompts of the builtin task mixture, with answers for verifiable rewards."""
    tasks: list[BuiltinTask] | None = None
    """Builtin only: which tasks of the mixture (default: all)."""
    n_per_task: int = Field(64, ge=1)
    """Builtin only: training prompts per task (held-out: a quarter of that, at least 4)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of file rows held out when no `eval_files` are given."""
    max_length: int = Field(128, ge=4)
    """Prompt tokens kept (cut from the left)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptDataSpec":
        one_source(self, ("files", "builtin"))
        return self


class PreferenceDataSpec(Section):
    """Preference pairs: exactly one of `files`, `builtin` or `step`."""

    files: PreferenceFiles | None = None
    """Globs of JSONL files (relative to the spec) with {prompt, chosen, rejected, score?} rows (text or chat)."""
    eval_files: PreferenceFiles | None = None
    """Globs of held-out JSONL files in the same format (default: eval_fraction of the training rows)."""
    builtin: Literal["preferences"] | None = None
    """`preferences`: correct vs near-miss answers on the task mixture, and polite vs rude wording."""
    tasks: list[BuiltinTask] | None = None
    """Builtin: which tasks to draw pairs from (default: all but `add`)."""
    n_per_task: int = Field(200, ge=1, le=1_000_000)
    """Builtin: training pairs per task."""
    step: Annotated[str | None, Ref("data")] = None
    """A step whose data output holds `preferences.jsonl` (e.g. a `constitutional` step)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the pairs held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per prompt + reply (the prompt is cut from the left, then the reply from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreferenceDataSpec":
        one_source(self, ("files", "builtin", "step"), frozenset({"tasks", "n_per_task"}), "preferences")
        return self


SheetFiles = Annotated[list[str], Input(rows="sheet")]
FILE_PREFIXES = ("./", "../", "/")


class SheetSpec(Section):
    """A labelling sheet a `collect` step wrote and people filled in (README, collect): rankings become the
    k(k-1)/2 pairs of each prompt; ratings become pairs by their difference, or train pointwise (`loss: mse`).

    Pairs only ever compare completions of one prompt labelled in one file, so a labeller's habits (one who
    rates everything a point higher) cancel out. Held-out prompts (`eval_fraction` of them, whole prompts) give
    the held-out pairs, ties left out.
    """

    files: SheetFiles
    """Globs of filled sheets, .csv or .jsonl (relative to the spec): one file per labeller, each a copy of the
    sheet (rows of prompts nobody labelled may stay blank or be deleted)."""
    key: Annotated[str, Ref("key", external=True)]
    """The collect step that wrote the sheet, or its key file `./key.jsonl`; the prompt and completion texts are
    read from the key, so an edited text cell in the sheet changes nothing."""
    mode: Literal["rank", "rate"]
    """The sheet's mode (collect's `mode`): `rank` reads the `rank` column (1 = best), `rate` the `rating` one
    (1-5)."""
    ties: Literal["drop", "soft"] = "drop"
    """Pairs of equal rank, or of ratings closer than min_gap: `drop` them (TRL and InstructGPT do), or `soft`:
    train on them with p = 0.5, which pulls the two rewards together (needs soft_labels)."""
    loss: Literal["pairs", "mse"] = "pairs"
    """Ratings only. `pairs` (default): pairs of one prompt and one labeller by rating difference, trained with
    the Bradley-Terry loss like rankings, so a labeller's offset cancels and ppo's reward scale means the same;
    `mse`: the reward regresses (rating - 3) / 2, pointwise, which uses the levels across prompts but also
    every labeller's offset and use of the scale."""
    min_gap: int = Field(1, ge=1, le=4)
    """Ratings as pairs: the smallest rating difference that makes a pair (a smaller one is a tie)."""

    @model_validator(mode="after")
    def _consistent(self) -> "SheetSpec":
        if is_external(self.key) and not self.key.startswith(FILE_PREFIXES):
            raise ValueError(f"key: a collect step's name or a key file ./key.jsonl; got {self.key!r}")
        stray = {"loss", "min_gap"} & self.model_fields_set
        if self.mode == "rank" and stray:
            raise ValueError(f"{' and '.join(sorted(stray))} {'apply' if len(stray) > 1 else 'applies'} to mode: rate "
                             "only (rankings always become pairs)")
        if self.mode == "rate" and self.loss == "mse" and "ties" in self.model_fields_set:
            raise ValueError("ties applies to pairs; loss: mse trains on every rating as it is")
        return self

    def pointwise(self) -> bool:
        """Whether training reads single rated completions rather than pairs."""
        return self.mode == "rate" and self.loss == "mse"

    def key_file(self) -> str | None:
        """The key as a file path written in the spec, or None when it is a step."""
        return self.key if self.key.startswith(FILE_PREFIXES) else None


class RewardDataSpec(PreferenceDataSpec):
    """Preference data for a reward model: exactly one of `files`, `builtin`, `step` or `sheet`."""

    sheet: SheetSpec | None = None
    """A filled labelling sheet of a `collect` step: rankings or ratings by people."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "RewardDataSpec":
        one_source(self, ("files", "builtin", "step", "sheet"), frozenset({"tasks", "n_per_task"}), "preferences")
        return self
