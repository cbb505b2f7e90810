"""Every spec mistake is reported as FILE:LINE:COL: field.path: message, all at once."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from schemas import SpecError, load
from schemas.loader import MAX_NODES

REPO = Path(__file__).resolve().parents[2]
LLMCYCLE = [sys.executable, "-m", "flows.cli"]
GOOD_STEP = "    kind: tokenize\n    corpus: {builtin: pydoc}\n"


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    """Load a spec that must be wrong; return its problems as printed."""
    with pytest.raises(SpecError) as err:
        load(path, overrides)
    lines = [str(p) for p in err.value.problems]
    for line in lines:  # the format every problem follows
        assert re.match(r"^.+:\d+:\d+: ", line), line
    return lines


def one(path: Path) -> str:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


def test_yaml_syntax_error_names_line(write_spec):
    path = write_spec("name: x\nsteps: [a\nseed: 1\n")
    assert re.match(rf"^{re.escape(str(path))}:3:\d+: YAML syntax error: .*expected ',' or ']'", one(path))


def test_tab_indentation(write_spec):
    path = write_spec("name: x\nsteps:\n  a:\n\tkind: tokenize\n")
    assert one(path) == f"{path}:4:1: tab character in indentation; YAML indents with spaces"


def test_empty_and_comment_only_files(write_spec):
    for text in ("", "# just a comment\n"):
        path = write_spec(text)
        assert one(path) == f"{path}:1:1: file is empty; expected a mapping with 'name' and 'steps'"


@pytest.mark.parametrize("text, what", [("- a\n- b\n", "a list"), ("just text\n", "a single value")])
def test_top_level_must_be_mapping(write_spec, text, what):
    path = write_spec(text)
    assert one(path) == f"{path}:1:1: top level must be a mapping of keys, got {what}"


def test_non_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\nsteps: {}\n".encode("latin-1"))
    assert one(path) == f"{path}:1:10: file is not valid UTF-8 (byte 0xe9); save it as UTF-8"


def test_duplicate_keys_at_any_depth(write_spec):
    path = write_spec("""\
        name: x
        steps:
          a:
            kind: tokenize
            vocab_size: 300
            corpus: {builtin: pydoc, builtin: pydoc}
            vocab_size: 400
          a:
            kind: tokenize
        name: y
        """)
    found = problems(path)
    assert f"{path}:6:30: steps.a.corpus.builtin: duplicate key 'builtin' (first defined at line 6)" in found
    assert f"{path}:7:5: steps.a.vocab_size: duplicate key 'vocab_size' (first defined at line 5)" in found
    assert f"{path}:8:3: steps.a: duplicate key 'a' (first defined at line 3)" in found
    assert f"{path}:10:1: name: duplicate key 'name' (first defined at line 1)" in found


def test_unknown_key_suggests_the_near_miss(write_spec):
    path = write_spec(f"name: x\nsteps:\n  a:\n{GOOD_STEP}    vocab_sise: 300\n")
    message = one(path)
    assert message.startswith(f"{path}:6:5: steps.a.vocab_sise: unknown key 'vocab_sise' "
                              "(did you mean 'vocab_size'?); expected one of: kind, corpus")


def test_unknown_top_level_key(write_spec):
    path = write_spec(f"name: x\nstep:\n  a:\n{GOOD_STEP}")
    found = problems(path)
    assert any(p.startswith(f"{path}:2:1: step: unknown key 'step' (did you mean 'steps'?)") for p in found)
    assert any(p.startswith(f"{path}:1:1: steps: missing required field 'steps'") for p in found)


def test_unknown_kind_reads_the_same_with_one_or_many_kinds(write_spec):
    path = write_spec("name: x\nsteps:\n  a:\n    kind: tokenise\n    corpus: {builtin: pydoc}\n")
    message = one(path)  # only the kind is reported, not the fields of some other kind
    assert message.startswith(f"{path}:4:11: steps.a.kind: unknown kind 'tokenise' (did you mean 'tokenize'?); "
                              "expected one of: ")
    assert "tokenize" in message.split("expected one of: ")[1].split(", ")


def test_missing_kind(write_spec):
    path = write_spec("name: x\nsteps:\n  a:\n    corpus: {builtin: pydoc}\n")
    assert one(path).startswith(f"{path}:4:5: steps.a: missing 'kind'; expected one of: ")


def test_wrong_type_and_out_of_range(write_spec):
    path = write_spec(f"name: x\nseed: -1\nsteps:\n  a:\n{GOOD_STEP}    vocab_size: many\n    val_fraction: 1.5\n")
    found = problems(path)
    assert found == [
        f"{path}:2:7: seed: Input should be greater than or equal to 0, got -1",
        f"{path}:7:17: steps.a.vocab_size: Input should be a valid integer, unable to parse string as an "
        'integer, got "many"',
        f"{path}:8:19: steps.a.val_fraction: Input should be less than 1, got 1.5",
    ]


def test_cross_field_rule_names_its_section(write_spec):
    path = write_spec("name: x\nsteps:\n  a:\n    kind: tokenize\n    corpus: {builtin: pydoc, files: [a.txt]}\n")
    assert one(path) == (f"{path}:5:13: steps.a.corpus: give exactly one of builtin, files, dataset "
                         "(got builtin, files)")


def test_bpe_vocabulary_must_hold_the_bytes(write_spec):
    path = write_spec("name: x\nsteps:\n  a: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 200}\n")
    assert one(path) == (f"{path}:3:6: steps.a: vocab_size 200 is too small for byte-level BPE: its 256 byte "
                         "tokens and 4 special tokens come first; use at least 260")
    assert load(path, ["steps.a.algorithm=unigram"]).spec.steps["a"].vocab_size == 200


def test_all_problems_reported_at_once(write_spec):
    path = write_spec("""\
        name: bad name
        seed: -3
        trainer: {precision: bf17}
        steps:
          a:
            kind: tokenize
            corpus: {builtin: pydoc}
            vocab_sise: 300
          b:
            kind: nope
          a:
            kind: tokenize
        """)
    found = problems(path)
    assert [p.split(": ")[1] for p in found] == ["name", "seed", "trainer.precision", "steps.a.vocab_sise",
                                                 "steps.b.kind", "steps.a"]
    assert "unknown precision 'bf17' (did you mean 'bf16'?)" in found[2]


def test_alias_bomb_fails_fast_in_bounded_memory(write_spec):
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for n in range(1, 12):  # 10**12 strings once expanded
        prev, name = chr(ord("a") + n - 1), chr(ord("a") + n)
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    path = write_spec("\n".join(levels) + "\n")
    tracemalloc.start()
    started = time.perf_counter()
    message = one(path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == (f"{path}:1:1: document expands to more than {MAX_NODES} nodes (aliases nested too deep?); "
                       "refusing to expand it")
    assert elapsed < 2.0
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_recursive_alias_is_refused(write_spec):
    path = write_spec("name: x\nsteps: &s [1, *s]\n")
    assert one(path) == f"{path}:1:1: an alias refers to the collection it is in; refusing to expand it"


def test_merge_keys_still_work(write_spec):
    path = write_spec("""\
        name: x
        defaults: &d {kind: tokenize, corpus: {builtin: pydoc}}
        steps:
          a: {<<: *d, vocab_size: 300}
        """)
    found = problems(path)  # `defaults` is not a field; the merged step itself is fine
    assert len(found) == 1 and found[0].startswith(f"{path}:2:1: defaults: unknown key 'defaults'")


# -- the command line: exit status 2, problems on stderr, no traceback -------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(LLMCYCLE + list(args), capture_output=True, text=True, cwd=cwd or REPO, timeout=60)


def test_cli_reports_every_problem_with_status_2(write_spec, tmp_path):
    bad = write_spec(f"name: x\nseed: -1\nsteps:\n  a:\n{GOOD_STEP}    vocab_sise: 3\n", "bad.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: \xff\n")
    empty = write_spec("", "empty.yaml")
    tabs = write_spec("name: x\n\tsteps: 1\n", "tabs.yaml")
    for path, expected in ((bad, [f"{bad}:2:7: seed: ", f"{bad}:7:5: steps.a.vocab_sise: unknown key"]),
                           (latin, [f"{latin}:1:7: file is not valid UTF-8"]),
                           (empty, [f"{empty}:1:1: file is empty"]),
                           (tabs, [f"{tabs}:2:1: tab character"]),
                           (tmp_path / "missing.yaml", [f"{tmp_path / 'missing.yaml'}:1:1: cannot read file"])):
        out = cli("validate", str(path))
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr + out.stdout
        lines = out.stderr.splitlines()
        assert lines[:len(expected)] == [next(line for line in lines if line.startswith(e)) for e in expected]
        assert lines[-1] == f"llmcycle: {len(expected)} problem(s) found"


def test_cli_plan_and_run_reject_a_bad_spec_without_writing(write_spec, tmp_path):
    path = write_spec("name: x\nworkdir: out\nsteps:\n  a:\n    kind: tokenise\n")
    for command in ("plan", "run"):
        out = cli(command, str(path))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "steps.a.kind: unknown kind 'tokenise'" in out.stderr
    assert not (tmp_path / "out").exists()
