"""`llmcycle run/plan/validate/ui` as a user calls them (in process, on the session's Prefect server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.cli import main

SPEC = """\
# yaml-language-server: $schema=../schemas/pipeline.schema.json
name: cli
workdir: work
steps:
  tok:
    kind: tokenize
    corpus: {files: [corpus.txt]}
    vocab_size: 270
"""


@pytest.fixture
def spec(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} for the command line" for i in range(20)))
    path = tmp_path / "cli.yaml"
    path.write_text(SPEC)
    return path


def plan_actions(spec: Path, capsys, *args: str) -> dict[str, str]:
    assert main(["plan", str(spec), "--json", *args]) == 0
    return {p["name"]: p["action"] for p in json.loads(capsys.readouterr().out)}


@pytest.mark.usefixtures("prefect_harness")
def test_run_then_plan_then_failure(spec, capsys):
    assert plan_actions(spec, capsys) == {"tok": "run"}
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "tok            ran" in out and f"browse: llmcycle ui {spec}" in out
    assert plan_actions(spec, capsys) == {"tok": "cached"}
    assert plan_actions(spec, capsys, "--force", "tok") == {"tok": "run"}
    assert plan_actions(spec, capsys, "--set", "steps.tok.vocab_size=300") == {"tok": "run"}

    assert main(["run", str(spec), "--set", "steps.tok.corpus.files=[gone.txt]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmcycle: step 'tok' (tokenize) failed: corpus.files: no file matches 'gone.txt'")


def test_unknown_step_in_force_or_only(spec, capsys):
    assert main(["plan", str(spec), "--only", "tokk"]) == 2
    assert capsys.readouterr().err.strip() == "llmcycle: no step named 'tokk'; steps: tok"
    assert main(["run", str(spec), "--force", "nope"]) == 2
    assert not (spec.parent / "work").exists()


def test_validate_several_specs_and_set(spec, capsys, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("name: cli", "name: other"))
    assert main(["validate", str(spec), str(other)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{spec}: ok (1 steps: tok)", f"{other}: ok (1 steps: tok)"]
    assert main(["validate", str(spec), "--set", "steps.tok.vocab_size=-1"]) == 2
    assert "--set[1]:1:22: steps.tok.vocab_size: Input should be greater than or equal to 64" in capsys.readouterr().err


def test_ui_opens_mlflow_on_the_pipeline_store(spec, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: launched.append(argv))  # don't start a server here
    assert main(["ui", str(spec), "--port", "5123"]) == 0
    [argv] = launched
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}"
    assert argv[argv.index("--port") + 1] == "5123"
    assert "http://127.0.0.1:5123" in capsys.readouterr().out
