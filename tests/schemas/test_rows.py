"""Data files are checked row by row before a step trains: every problem with its FILE:LINE, at once."""

import json
from pathlib import Path

import pytest

import schemas
from schemas.rows import MAX_PER_FILE, data_problems

SPEC = """\
name: rows
steps:
  tok:
    kind: tokenize
    vocab_size: 300
    corpus: {{files: [{corpus}]}}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {{family: llama, layers: 1, hidden: 32, heads: 2, context: 32}}
    max_steps: 1
  sft:
    kind: finetune
    model: lm
    data: {{files: [{sft}]}}
  dpo:
    kind: dpo
    model: sft
    data: {{files: [{pairs}]}}
"""


def problems(tmp_path: Path, corpus="c.txt", sft="s.jsonl", pairs="p.jsonl") -> dict[str, list[str]]:
    (tmp_path / "spec.yaml").write_text(SPEC.format(corpus=corpus, sft=sft, pairs=pairs))
    loaded = schemas.load(tmp_path / "spec.yaml")
    resolve = lambda p: loaded.base_dir / p  # noqa: E731
    return {name: data_problems(step, resolve) for name, step in loaded.spec.steps.items()}


def write(path: Path, *rows, raw: bytes = b"") -> None:
    path.write_bytes(raw + "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode())


def test_unusual_but_valid_files_are_accepted(tmp_path):
    # a byte-order mark, CRLF line endings, blank lines, chat rows, TRL's conversational preferences
    (tmp_path / "c.txt").write_bytes("\ufeffone document\r\n\r\nanother, déjà vu\r\n".encode())
    write(tmp_path / "s.jsonl", {"prompt": "a", "completion": "b"}, "\r\n", "\n",
          {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}, raw=b"\xef\xbb\xbf")
    write(tmp_path / "p.jsonl", {"prompt": "q", "chosen": "good", "rejected": "bad", "score": 1},
          {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "y"}],
           "rejected": [{"role": "assistant", "content": "n"}]})
    assert problems(tmp_path) == {"tok": [], "lm": [], "sft": [], "dpo": []}


def test_every_broken_row_is_named_with_its_line_and_field(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"fine\n\nbad \xff byte\n")
    write(tmp_path / "s.jsonl",
          {"prompt": "ok", "completion": "ok"},             # 1
          "{not json\n",                                    # 2
          "[1, 2]\n",                                       # 3
          {"prompt": "no completion"},                      # 4
          {"prompt": 3, "completion": "x"},                 # 5
          {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 6
          {"messages": [{"role": "user", "content": "only a question"}]})  # 7
    write(tmp_path / "p.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b", "score": 1.5},
          {"prompt": "q", "chosen": "a"})
    found = problems(tmp_path)
    s, c, p = tmp_path / "s.jsonl", tmp_path / "c.txt", tmp_path / "p.jsonl"
    assert found["tok"] == [f"{c}:3: not UTF-8 (byte 0xff at column 5); re-save the file as UTF-8"]
    assert found["sft"][0].startswith(f"{s}:2: not valid JSON")
    assert found["sft"][1] == f"{s}:3: expected a JSON object, got list '[1, 2]'"
    assert found["sft"][2] == f"{s}:4: row: a row needs {{prompt, completion}} or {{messages: [...]}}"
    assert found["sft"][3] == f'{s}:5: prompt: Input should be a valid string (got 3)'
    assert found["sft"][4].startswith(f"{s}:6: messages.0.role: Input should be 'system', 'user' or 'assistant'")
    assert "(got \"robot\")" in found["sft"][4]
    assert found["sft"][5] == f"{s}:7: row: the last message must be the assistant's reply, got role 'user'"
    assert len(found["sft"]) == 6
    assert found["dpo"][0].startswith(f"{p}:1: score: Input should be less than or equal to 1") and "1.5" in found["dpo"][0]
    assert found["dpo"][1] == f"{p}:2: rejected: Field required"


def test_empty_files_missing_globs_and_floods_of_errors(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n")
    write(tmp_path / "s.jsonl", *[{"prompt": i} for i in range(MAX_PER_FILE + 15)])
    found = problems(tmp_path, pairs="nothing/*.jsonl")
    assert found["tok"] == [f"{tmp_path / 'c.txt'}: the file is empty (no non-blank line)"]
    assert len(found["sft"]) == MAX_PER_FILE + 1
    assert found["sft"][-1] == f"{tmp_path / 's.jsonl'}: ... and {MAX_PER_FILE + 15 - MAX_PER_FILE} more problem(s)"
    # every row has two problems (prompt not a string, no completion): the count is of problems
    assert found["dpo"] == [f"data.files: no file matches 'nothing/*.jsonl' (resolved to {tmp_path / 'nothing/*.jsonl'})"]


def test_a_jsonl_corpus_needs_its_text_field_in_every_row(tmp_path):
    write(tmp_path / "c.jsonl", {"text": "a"}, {"body": "b"}, {"text": 7})
    write(tmp_path / "s.jsonl", {"prompt": "a", "completion": "b"})
    write(tmp_path / "p.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b"})
    found = problems(tmp_path, corpus="c.jsonl")["tok"]
    c = tmp_path / "c.jsonl"
    assert found == [f"{c}:2: text: missing; fields: body", f"{c}:3: text: expected a string (got 7); fields: text"]


@pytest.mark.parametrize("size", [9 * 1024 * 1024])
def test_a_line_too_long_to_be_a_row_is_refused_without_reading_more(tmp_path, size):
    (tmp_path / "c.txt").write_text("x" * size + "\nfine\n")
    write(tmp_path / "s.jsonl", {"prompt": "a", "completion": "b"})
    write(tmp_path / "p.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b"})
    [problem] = problems(tmp_path)["tok"]
    assert problem == f"{tmp_path / 'c.txt'}:1: line is {size + 1:,} bytes (rows over 8 MiB are refused)"
