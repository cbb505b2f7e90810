"""Data sections: where a step's corpus, rows, pairs or prompts come from (shared by several kinds).

Fields holding files (globs relative to the spec) are `InputFiles`: their contents are part of the step's
fingerprint, so editing a data file re-runs the steps that read it.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
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


STREAM_ABOVE_MB = 64
"""`stream: auto` streams a JSONL source whose training files total more than this many MiB. Loaded rows and
their tokens take about 14x the file's size in memory (a 50 MB file: 0.7 GB here), which is small below this."""
SOURCE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class Weighted(Section):
    """What a mixture entry adds to its source: a weight and a name."""

    weight: float = Field(1.0, gt=0)
    """Relative weight: a share weight / (sum of the weights) of the training rows comes from this source."""
    name: str | None = Field(None, pattern=SOURCE_NAME)
    """Name of the source in the logged proportions `data/mixture/<name>` (default: the first file's stem,
    `builtin`, or the step's name)."""

    def source_name(self) -> str:
        """The name given, else one derived from the source."""
        if self.name:
            return self.name
        if self.files:
            return re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(self.files[0]).stem).strip("_.-") or "files"
        return "builtin" if self.builtin else self.step


class Mixed:
    """For a data section with `mixture`, `mixture_size` and `stream` fields. (No annotations here: pydantic
    would take them for fields.)"""

    def source_names(self) -> list[str]:
        """The mixture's source names, in order ([] without a mixture)."""
        return [entry.source_name() for entry in self.mixture or []]

    def mixture_summary(self) -> str:
        """The sources and their normalised weights, for `llmcycle plan`."""
        total = sum(e.weight for e in self.mixture)
        return "mixture of " + ", ".join(f"{e.source_name()} {e.weight / total:.0%}" for e in self.mixture)

    def one_source_or_mixture(self, sources: tuple[str, ...], builtin_only: frozenset[str], builtin: str) -> None:
        """`one_source`'s checks, or, with a mixture, that the sources are all inside it with distinct names."""
        if self.mixture is None:
            if self.mixture_size is not None:
                raise ValueError("mixture_size goes with mixture")
            one_source(self, sources + ("mixture",), builtin_only, builtin)
            return
        if getattr(self, "sheet", None) is not None:
            raise ValueError("sheet cannot be mixed (its pairs come from one collect step's sheet): train on the "
                             "sheet alone, or drop it for a mixture of files, builtin and step sources")
        here = [k for k in sources + ("eval_files",) if k != "sheet" and getattr(self, k) is not None]
        here += sorted(builtin_only & self.model_fields_set)
        if here:
            raise ValueError(f"mixture holds the sources: move {', '.join(here)} into one of its entries "
                             "({files: [...] | builtin | step, weight}), or drop mixture")
        names = self.source_names()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"mixture: more than one source is named '{twice[0]}'; give each entry its own name")


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


class PackingSpec(Section):
    """Several examples per row, each attending only to itself (components/lib/packing.py): the compute spent on
    padding goes to real tokens. Needs a transformer (not the mlp/rnn/lstm families) and not prompt tuning."""

    strategy: Literal["padding_free", "bfd"] = "padding_free"
    """`padding_free`: each batch's examples are packed into as few rows as fit, so a step sees the same examples
    and the same loss as without packing (TRL's `padding_free`); `bfd`: the whole training set is packed once
    into rows of `length` tokens by best-fit decreasing and `batch_size` counts rows (TRL's `packing=True`),
    so a step sees more examples (finetune only)."""
    length: int | None = Field(None, ge=8)
    """Tokens per packed row (default: the data's `max_length`). Longer rows mean fewer rows but a larger
    attention mask per row: on this CPU, rows of 256 tokens trained 1.15x faster than one row per batch."""


class PackedBatches:
    """For a kind with a `packing: bool | PackingSpec` field: the settings it means, or None. (No annotations
    here: pydantic would take them for fields of the kind.)"""

    def packing_spec(self) -> PackingSpec | None:
        """`packing: true` is the default strategy; false is no packing."""
        p = self.packing
        return PackingSpec() if p is True else (p or None)

    def packing_problem(self, kinds_with_bfd: bool = False) -> str:
        """The error of packing settings this step cannot honour, or ""."""
        p = self.packing_spec()
        if p is None:
            return ""
        if p.strategy == "bfd" and not kinds_with_bfd:
            return ("packing.strategy bfd packs the whole training set once (finetune); this kind packs each batch: "
                    "use padding_free")
        if getattr(getattr(self, "peft", None), "method", None) == "prompt_tuning":
            return "packing cannot go with prompt_tuning: its virtual tokens are prepended to every row"
        return ""


class SftSource(Section):
    """Where instruction rows come from: the fields of a data section and of each of its mixture entries."""

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


SFT_SOURCES, SFT_BUILTIN_ONLY = ("files", "builtin", "step"), frozenset({"tasks", "n_per_task", "eval_per_task"})


class SftMixtureEntry(Weighted, SftSource):
    """One source of a mixture: exactly one of `files`, `builtin` or `step`, with its weight."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "SftMixtureEntry":
        one_source(self, SFT_SOURCES, SFT_BUILTIN_ONLY, "tasks")
        return self


class SftDataSpec(Mixed, SftSource):
    """Instruction data: exactly one of `files`, `builtin`, `step` or `mixture`."""

    mixture: list[SftMixtureEntry] | None = Field(None, min_length=1)
    """Sources drawn by weight, e.g. [{files: [a.jsonl], weight: 0.7}, {builtin: tasks, weight: 0.3}]: each
    training row comes from a source picked with probability weight / total (seeded); every source's own
    held-out rows are scored, concatenated (components/lib/datasources.py)."""
    mixture_size: int | None = Field(None, ge=1)
    """Training rows drawn per pass over a mixture (default: the sum of its sources' training rows)."""
    stream: Literal["auto"] | bool = "auto"
    """Read JSONL training files lazily instead of loading them (`auto`: a source whose files total over
    64 MB): held-out rows split by the same hash, at most 2,000 of them scored, training rows shuffled in a
    10,000-row buffer and tokenised as drawn; the budget is max_steps or max_tokens."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the rows held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt cut from the left, then the completion from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "SftDataSpec":
        self.one_source_or_mixture(SFT_SOURCES, SFT_BUILTIN_ONLY, "tasks")
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


class PreferenceSource(Section):
    """Where preference pairs come from: the fields of a data section and of each of its mixture entries."""

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


PREFERENCE_SOURCES, PREFERENCE_BUILTIN_ONLY = ("files", "builtin", "step"), frozenset({"tasks", "n_per_task"})


class PreferenceMixtureEntry(Weighted, PreferenceSource):
    """One source of a mixture: exactly one of `files`, `builtin` or `step`, with its weight."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreferenceMixtureEntry":
        one_source(self, PREFERENCE_SOURCES, PREFERENCE_BUILTIN_ONLY, "preferences")
        return self


class PreferenceDataSpec(Mixed, PreferenceSource):
    """Preference pairs: exactly one of `files`, `builtin`, `step` or `mixture`."""

    mixture: list[PreferenceMixtureEntry] | None = Field(None, min_length=1)
    """Sources drawn by weight, e.g. [{files: [a.jsonl], weight: 0.7}, {builtin: preferences, weight: 0.3}]:
    each training pair comes from a source picked with probability weight / total (seeded); every source's own
    held-out pairs are scored, concatenated (components/lib/datasources.py)."""
    mixture_size: int | None = Field(None, ge=1)
    """Training pairs drawn per pass over a mixture (default: the sum of its sources' training pairs)."""
    stream: Literal["auto"] | bool = "auto"
    """Read JSONL training files lazily instead of loading them (`auto`: a source whose files total over
    64 MB): held-out pairs split by the same hash, at most 2,000 of them scored, training pairs shuffled in a
    10,000-pair buffer and tokenised as drawn; the budget is max_steps or max_tokens."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the pairs held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per prompt + reply (the prompt is cut from the left, then the reply from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreferenceDataSpec":
        self.one_source_or_mixture(PREFERENCE_SOURCES, PREFERENCE_BUILTIN_ONLY, "preferences")
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
    """Preference data for a reward model: exactly one of `files`, `builtin`, `step`, `sheet` or `mixture`."""

    sheet: SheetSpec | None = None
    """A filled labelling sheet of a `collect` step: rankings or ratings by people."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "RewardDataSpec":
        self.one_source_or_mixture(PREFERENCE_SOURCES + ("sheet",), PREFERENCE_BUILTIN_ONLY, "preferences")
        return self
