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


def ledger_lines(out: str) -> list[list[str]]:
    """The cells of the ledger table `llmcycle run` printed (header first, up to the totals' rule)."""
    lines = out.split("ledger: time and effort of this run\n", 1)[1].splitlines()
    return [line.split() for line in lines[:next(i for i, line in enumerate(lines) if set(line) == {"-"})]]


def last_ledger(spec: Path, tmp_path: Path) -> dict:
    """ledger.json of the pipeline's latest parent run in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("cli").experiment_id], "tags.`mlflow.runName` = 'cli'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ledger.json", "ledger.md"}
    return json.loads(Path(client.download_artifacts(parent.info.run_id, "ledger.json", str(tmp_path))).read_text())


@pytest.mark.usefixtures("prefect_harness")
def test_run_then_plan_then_failure(spec, capsys, tmp_path):
    assert plan_actions(spec, capsys) == {"tok": "run"}
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "tok            ran" in out and f"browse: llmcycle ui {spec}" in out
    [tok] = last_ledger(spec, tmp_path)["rows"]  # a row per step, with what the step reported
    [result] = [json.loads(p.read_text()) for p in (spec.parent / "work" / "tok").glob("*/result.json")]
    assert tok["tokens"] == result["metrics"]["train/tokens"] + result["metrics"]["val/tokens"]
    assert (tok["status"], tok["examples_of"], tok["flops"], tok["seconds"]) == (
        "ran", "documents", None, result["metrics"]["time/seconds"])
    header, row = ledger_lines(out)
    assert header[:4] == ["step", "kind", "status", "wall"] and row[:3] == ["tok", "tokenize", "ran"]
    assert row[-3:] == ["20", "documents", "-"]
    assert plan_actions(spec, capsys) == {"tok": "cached"}
    assert plan_actions(spec, capsys, "--force", "tok") == {"tok": "run"}
    assert plan_actions(spec, capsys, "--set", "steps.tok.vocab_size=300") == {"tok": "run"}

    assert main(["run", str(spec), "--set", "steps.tok.corpus.files=[gone.txt]"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("llmcycle: step 'tok' (tokenize) failed: corpus.files: no file matches 'gone.txt'")
    [_, failed] = ledger_lines(captured.out)  # the time until it failed, then blanks
    assert failed[:3] == ["tok", "tokenize", "failed"] and failed[4] == "s" and failed[5:] == ["-"] * 6
    assert last_ledger(spec, tmp_path)["rows"][0]["status"] == "failed"


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
