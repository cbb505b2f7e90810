"""Data files checked before any training: every row of every file a step reads, all problems at once.

A step's data fields carry their row format (`Input(rows=...)` in schemas/base.py); `data_problems` walks
them, reads each file once and reports `FILE:LINE: field: what is wrong (got ...)`, at most `MAX_PER_FILE`
per file plus a count of the rest. The same check runs when a step starts (flows/step.py, before the model
is built) and in `llmcycle validate --data`. It is light (pydantic and the standard library only), so a CI
job can check a data drop without installing torch's half of llmcycle.

Accepted as valid: a UTF-8 byte-order mark, CRLF line endings, blank lines. Refused: bytes that are not
UTF-8, lines that are not JSON or not an object, missing or mistyped fields, unknown chat roles, scores
outside [0, 1], empty files, globs that match nothing, lines over `MAX_LINE_BYTES`.

Filled labelling sheets (`sheet` rows, written by `collect`) may also be .csv files with a header row; their
line numbers are those where each record starts (a quoted cell may span lines).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path
from typing import Callable, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_PER_FILE = 20  # problems listed per file; the rest are counted
MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line is a broken export, not a row


class DataProblems(ValueError):
    """Data that a step cannot use; the message lists every problem found (capped per file)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} data problems:\n" + "\n".join(f"  {p}" for p in problems))


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # strict: a number is not a string


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class SftRow(_Row):
    """TRL's two formats: {prompt, completion} or {messages: [...]} ending with the assistant's reply."""

    prompt: str | None = None
    completion: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_format(self) -> "SftRow":
        if self.messages is None and (self.prompt is None or self.completion is None):
            raise ValueError("a row needs {prompt, completion} or {messages: [...]}")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages is empty")
            if self.messages[-1].role != "assistant":
                raise ValueError(f"the last message must be the assistant's reply, got role '{self.messages[-1].role}'")
        return self


class PromptRow(_Row):
    """{prompt, ...} or chat {messages: [...]}; other fields reach reward functions."""

    prompt: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_format(self) -> "PromptRow":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a row needs exactly one of prompt or messages")
        return self


class PreferenceRow(_Row):
    """{prompt, chosen, rejected, score?}: text, or TRL's conversational form (message lists)."""

    prompt: Union[str, list[Message]] = ""
    chosen: Union[str, list[Message]]
    rejected: Union[str, list[Message]]
    score: float = Field(1.0, ge=0.0, le=1.0, strict=False)  # an int 1 is a fine probability


class TaskRow(_Row):
    """An example of an evaluation task: {prompt, answer, choices?}."""

    prompt: str
    answer: str
    choices: list[str] | None = None

    @model_validator(mode="after")
    def _answer_among_choices(self) -> "TaskRow":
        if self.choices is not None and self.answer not in self.choices:
            raise ValueError(f"the answer '{self.answer}' is not one of the choices")
        return self


class ReferenceRow(_Row):
    """A prompt and the text(s) a good generation resembles: {prompt, reference: str | [str, ...]}."""

    prompt: str
    reference: Union[str, list[str]]

    @model_validator(mode="after")
    def _some_reference(self) -> "ReferenceRow":
        if isinstance(self.reference, list) and not self.reference:
            raise ValueError("reference is an empty list; give one string or a list of strings")
        return self


RATINGS = (1, 5)  # a rated sheet's scale: 1 = worst, 5 = best


class SheetRow(_Row):
    """A row of a filled labelling sheet (collect): {id, rank} (1 = best, equal ranks tie) or {id, rating} (1-5),
    blank ("" or null) until labelled; the other columns (prompt, completion, label) are for the labeller."""

    id: str
    rank: int | None = Field(None, strict=False)  # a CSV cell is text: "2" is rank 2
    rating: int | None = Field(None, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_none(cls, data):
        if isinstance(data, dict):
            data = {k: (v.strip() or None) if k in ("rank", "rating") and isinstance(v, str) else v
                    for k, v in data.items()}
        return data

    @field_validator("rank")
    @classmethod
    def _rank_from_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("ranks start at 1 (the best completion of its prompt)")
        return value

    @field_validator("rating")
    @classmethod
    def _rating_on_scale(cls, value: int | None) -> int | None:
        if value is not None and not RATINGS[0] <= value <= RATINGS[1]:
            raise ValueError(f"ratings go from {RATINGS[0]} (worst) to {RATINGS[1]} (best)")
        return value

    @model_validator(mode="after")
    def _one_column(self) -> "SheetRow":
        given = [c for c in ("rank", "rating") if c in self.model_fields_set]
        if not given:
            raise ValueError("a sheet row needs a rank or a rating column, as the sheet collect wrote")
        if self.rank is not None and self.rating is not None:
            raise ValueError("give a rank or a rating, not both")
        return self


ROW_MODELS: dict[str, type[BaseModel]] = {"sft": SftRow, "prompt": PromptRow, "preference": PreferenceRow,
                                          "task": TaskRow, "reference": ReferenceRow, "sheet": SheetRow}


def lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) per non-blank line: the text without its line ending, or why it is unusable
    (not UTF-8, too long). A byte-order mark on the first line is dropped."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES:
                yield n, None, f"line is {len(raw):,} bytes (rows over {MAX_LINE_BYTES // 2**20} MiB are refused)"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield n, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); re-save the file as UTF-8"
                continue
            if text.strip():
                yield n, text.rstrip("\r\n"), None


def _pydantic_problems(err: ValidationError) -> Iterator[str]:
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "row"
        message = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {json.dumps(got, default=str)[:60]})"
        yield f"{field}: {message}{shown}"


def jsonl_problems(path: Path, rows: str | None = None, text_field: str | None = None) -> tuple[list[str], int]:
    """(problems, rows read) of a JSONL file: each line a JSON object, of the `rows` format when given, with a
    string `text_field` when given."""
    model = ROW_MODELS.get(rows or "")
    problems, count = [], 0
    for n, text, problem in lines(path):
        count += 1
        where = f"{path}:{n}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__} {text[:40]!r}")
            continue
        if text_field is not None:
            value = row.get(text_field)
            if not isinstance(value, str):
                what = "missing" if text_field not in row else f"expected a string (got {json.dumps(value)[:60]})"
                problems.append(f"{where}: {text_field}: {what}; fields: {', '.join(row) or 'none'}")
        if model is not None:
            try:
                model.model_validate(row)
            except ValidationError as err:
                problems += [f"{where}: {p}" for p in _pydantic_problems(err)]
    return problems, count


def csv_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line, row, problem) per record of a CSV file with a header row: the row as {column: cell}, or why it is
    unusable; `line` is where the record starts. A byte-order mark is dropped."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield data[:err.start].count(b"\n") + 1, None, (f"not UTF-8 (byte 0x{data[err.start]:02x}); re-save the file "
                                                        "as CSV UTF-8")
        return
    reader = csv.reader(io.StringIO(text, newline="\n"))  # lines end at \n only, as editors count them
    header, start = None, 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) != len(header):
                yield line, None, f"{len(cells)} cells where the header has {len(header)} columns"
                continue
            yield line, dict(zip(header, cells)), None
    except csv.Error as err:
        yield start, None, f"not valid CSV ({err})"


def sheet_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a filled sheet (.csv or .jsonl) as {id, rank and/or rating (the columns it has; None: blank),
    _where}, and every problem (FILE:LINE)."""
    rows, problems = [], []
    for n, row, problem in csv_records(path) if path.suffix == ".csv" else _jsonl_records(path):
        where = f"{path}:{n}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        try:
            parsed = SheetRow.model_validate(row)
        except ValidationError as err:
            problems += [f"{where}: {p}" for p in _pydantic_problems(err)]
            continue
        given = {c: getattr(parsed, c) for c in ("rank", "rating") if c in parsed.model_fields_set}
        rows.append({"id": parsed.id, **given, "_where": where})
    if not rows and not problems:
        problems.append(f"{path}: the sheet has no rows")
    return rows, problems


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line, row, problem) per non-blank line of a JSONL file."""
    for n, text, problem in lines(path):
        if problem:
            yield n, None, problem
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            yield n, None, f"not valid JSON ({err.msg} at column {err.colno})"
            continue
        if not isinstance(row, dict):
            yield n, None, f"expected a JSON object, got {type(row).__name__} {text[:40]!r}"
            continue
        yield n, row, None


def text_problems(path: Path) -> tuple[list[str], int]:
    """(problems, non-blank lines) of a text file: UTF-8 throughout, lines of sane length."""
    problems, count = [], 0
    for n, _, problem in lines(path):
        count += 1
        if problem:
            problems.append(f"{path}:{n}: {problem}")
    return problems, count


def file_problems(path: Path, rows: str | None, text_field: str | None = None) -> list[str]:
    """Every problem of one data file (capped at MAX_PER_FILE, with a count of the rest)."""
    if not path.is_file():
        return [f"{path}: not a file"]
    if rows == "constitution":
        return _constitution_problems(path)
    if path.suffix == ".jsonl" and rows != "file":
        problems, count = jsonl_problems(path, rows, text_field)
    elif path.suffix == ".csv" and rows == "sheet":
        problems = sheet_rows(path)[1]  # an empty sheet is one of them
        count = 1
    elif rows in ROW_MODELS:
        return [f"{path}: expected a .jsonl{' or .csv' if rows == 'sheet' else ''} file of {rows} rows"]
    else:
        problems, count = text_problems(path)
    if count == 0:
        problems.append(f"{path}: the file is empty (no non-blank line)")
    if len(problems) > MAX_PER_FILE:
        problems = problems[:MAX_PER_FILE] + [f"{path}: ... and {len(problems) - MAX_PER_FILE} more problem(s)"]
    return problems


def _constitution_problems(path: Path) -> list[str]:
    from .constitution import load_constitution
    from .errors import SpecError

    try:
        load_constitution(path)
    except SpecError as err:
        return [str(p) for p in err.problems]
    return []


def data_problems(step, resolve: Callable[[str], Path]) -> list[str]:
    """Every problem in the data files step spec `step` reads (globs resolved by `resolve`); [] when all is well."""
    from .base import walk_inputs

    problems: list[str] = []
    for field, patterns, marker, section in walk_inputs(step):
        if marker.rows is None:
            continue
        rows = marker.rows if step.checks_rows(field) else "file"
        text_field = getattr(section, "text_field", None) if rows == "text" else None
        for pattern in patterns:
            matches = sorted(glob.glob(str(resolve(pattern)), recursive=True))
            if not matches:
                problems.append(f"{field}: no file matches '{pattern}' (resolved to {resolve(pattern)})")
            for match in matches:
                problems += file_problems(Path(match), rows, text_field)
    return problems


def check_data(step, resolve: Callable[[str], Path]) -> None:
    """Raise DataProblems listing every problem in the step's data files."""
    problems = data_problems(step, resolve)
    if problems:
        raise DataProblems(problems)
