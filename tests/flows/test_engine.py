"""The engine: fingerprint caching, --force, --only, atomic outputs, failures, fail-fast on bad specs.

Specs here use tokenize steps on a tiny corpus (seconds each) and share one MLflow store per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import schemas
from flows.pipeline import format_failure, run_pipeline
from flows.plan import make_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")

TWO_STEPS = """\
name: engine
workdir: work
tracking: {{uri: "{uri}"}}
steps:
  a:
    kind: tokenize
    corpus: {{files: [corpus.txt]}}
    vocab_size: 280
  b:
    kind: tokenize
    corpus: {{files: [{b_files}]}}
    vocab_size: 290
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path, store):
    """A spec folder with a small corpus; returns a function writing the spec and giving its path."""
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"document {i}: tokens, merges and the text they come from"
                                                     for i in range(40)))

    def write(b_files: str = "corpus.txt") -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(TWO_STEPS.format(uri=store, b_files=b_files))
        return path

    return write


def folders(spec: Path, step: str) -> list[str]:
    return sorted(p.name for p in (spec.parent / "work" / step).iterdir() if not p.name.startswith("."))


def test_rerun_skips_changed_step_reruns_force_and_only(project):
    spec = project()
    first = run_pipeline(str(spec))
    assert {n: r["status"] for n, r in first.items()} == {"a": "ran", "b": "ran"}
    stamp = {n: (Path(r["dir"]) / "result.json").stat().st_mtime_ns for n, r in first.items()}

    again = run_pipeline(str(spec))
    assert {n: r["status"] for n, r in again.items()} == {"a": "cached", "b": "cached"}
    assert {n: r["dir"] for n, r in again.items()} == {n: r["dir"] for n, r in first.items()}
    assert {n: (Path(r["dir"]) / "result.json").stat().st_mtime_ns for n, r in again.items()} == stamp
    assert again["a"]["metrics"] == first["a"]["metrics"]

    changed = run_pipeline(str(spec), overrides=["steps.b.vocab_size=300"])
    assert {n: r["status"] for n, r in changed.items()} == {"a": "cached", "b": "ran"}
    assert changed["b"]["fingerprint"] != first["b"]["fingerprint"]
    assert len(folders(spec, "b")) == 2 and len(folders(spec, "a")) == 1  # the old output stays for reuse

    forced = run_pipeline(str(spec), force=["a"])
    assert {n: r["status"] for n, r in forced.items()} == {"a": "ran", "b": "cached"}
    assert forced["a"]["dir"] == first["a"]["dir"]  # same fingerprint, output replaced in place
    assert (Path(forced["a"]["dir"]) / "result.json").stat().st_mtime_ns > stamp["a"]

    only = run_pipeline(str(spec), overrides=["steps.a.vocab_size=270", "steps.b.vocab_size=270"], only=["b"])
    assert list(only) == ["b"] and only["b"]["status"] == "ran"
    assert len(folders(spec, "a")) == 1  # a was changed too, but not selected
    assert not [p for p in (spec.parent / "work").rglob(".tmp-*")]


def test_input_file_contents_are_part_of_the_fingerprint(project):
    spec = project()
    before = {p.name: p.fingerprint for p in make_plan(schemas.load(spec))}
    with open(spec.parent / "corpus.txt", "a") as fh:
        fh.write("\n\none more document")
    after = {p.name: p.fingerprint for p in make_plan(schemas.load(spec))}
    assert before["a"] != after["a"] and before["b"] != after["b"]


def test_incomplete_output_is_not_reused(project):
    spec = project()
    [planned, _] = make_plan(schemas.load(spec))
    planned.output_dir.mkdir(parents=True)
    (planned.output_dir / "tokens").mkdir()  # what a crash before the rename would leave, minus result.json
    result = run_pipeline(str(spec), only=["a"])
    assert result["a"]["status"] == "ran"
    assert (planned.output_dir / "result.json").is_file()
    assert (planned.output_dir / "tokenizer" / "tokenizer.json").is_file()


def test_failing_step_fails_the_flow_and_keeps_upstream_outputs(project, store):
    spec = project(b_files="missing/*.txt")
    with pytest.raises(Exception) as err:
        run_pipeline(str(spec))
    message = format_failure(err.value)
    assert message == ("step 'b' (tokenize) failed: corpus.files: no file matches 'missing/*.txt' (resolved to "
                       f"{spec.parent}/missing/*.txt). Outputs of the completed steps are kept; fix the cause and run "
                       "again to resume from there.")
    assert "\n" not in message
    plan = {p.name: p for p in make_plan(schemas.load(spec))}
    assert plan["a"].cached and not plan["b"].cached  # a's output kept, nothing half-written for b
    assert not folders(spec, "b")  # nothing half-written: only the engine's own .run-* folder (its log)

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("engine")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'engine'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    steps = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    status = {r.data.tags["llmcycle.step"]: r.info.status for r in steps}
    assert parent.info.status == "FAILED"
    assert status["b"] == "FAILED"
    assert status["a"] == "FINISHED"
    assert "no file matches" in {r.data.tags["llmcycle.step"]: r for r in steps}["b"].data.tags["llmcycle.error"]


def test_bad_spec_fails_fast_and_writes_nothing(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nworkdir: work\nsteps:\n  a: {kind: tokenize, corpus: {builtin: pydoc}, vocab: 3}\n")
    with pytest.raises(schemas.SpecError, match="steps.a.vocab: unknown key 'vocab'"):
        run_pipeline(str(spec))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_plan_json_lists_every_step(project):
    spec = project()
    plan = [p.to_json() for p in make_plan(schemas.load(spec), only=["a"])]
    assert [(p["name"], p["kind"], p["action"]) for p in plan] == [("a", "tokenize", "run"), ("b", "tokenize", "skip")]
    assert all(len(p["fingerprint"]) == 64 and Path(p["output_dir"]).parent.name == p["name"] for p in plan)
    json.dumps(plan)
