"""The JSON Schema editors use, the shipped specs, and the promise that `schemas` stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import schemas

REPO = Path(__file__).resolve().parents[2]
SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/pipeline.schema.json"
SHIPPED = sorted((REPO / "specs").glob("*.yaml")) + sorted((REPO / "specs" / "course").glob("*.yaml"))


def test_committed_schema_is_in_sync():
    committed = json.loads((REPO / "schemas" / "pipeline.schema.json").read_text())
    assert committed == schemas.json_schema(), \
        "schemas/pipeline.schema.json is stale: run `.venv/bin/llmcycle schema > schemas/pipeline.schema.json`"


def test_schema_command_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "schema"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    printed = json.loads(out.stdout)
    assert printed == schemas.json_schema()
    step = printed["$defs"]["TokenizeSpec"]["properties"]
    assert step["vocab_size"]["description"] == "Vocabulary size, special tokens included."
    assert (step["vocab_size"]["minimum"], step["vocab_size"]["maximum"]) == (64, 1_000_000)
    assert printed["$defs"]["TokenizeSpec"]["additionalProperties"] is False
    kinds = printed["properties"]["steps"]["additionalProperties"]["discriminator"]["mapping"]
    assert set(kinds) == set(schemas.KINDS)


def test_every_kind_documents_every_field():
    for name, definition in json_defs().items():
        for field, body in definition.get("properties", {}).items():
            if field != "kind":
                assert body.get("description"), f"{name}.{field} has no docstring"


def json_defs() -> dict:
    return schemas.json_schema()["$defs"]


def test_specs_are_shipped():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "specs")) for p in SHIPPED])
def test_shipped_spec_has_schema_comment_and_validates(path):
    up = "../" * (len(path.relative_to(REPO / "specs").parts) - 1)  # specs/course/x.yaml: one folder deeper
    assert path.read_text().splitlines()[0] == SCHEMA_COMMENT.replace("=../", f"=../{up}")
    loaded = schemas.load(path)
    assert loaded.spec.steps


def test_import_schemas_stays_light():
    heavy = ["torch", "lightning", "transformers", "peft", "mlflow", "prefect", "numpy", "datasets"]
    code = ("import sys, schemas; schemas.load(sys.argv[1]); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "specs" / "quickstart.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_command_stays_light():
    heavy = ["torch", "lightning", "transformers", "peft", "mlflow", "prefect"]
    code = ("import sys; from flows.cli import main; code = main(['validate', sys.argv[1]]); "
            f"print(code, [m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "specs" / "quickstart.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"
