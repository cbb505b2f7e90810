"""compare: one table and one figure from the results of steps that ran; clear errors for what they lack."""

from __future__ import annotations

import json

import pytest

from components.lib.context import StepResult
from tests.conftest import check_contract, make_ctx

METRICS = {"val/perplexity": 42.5, "perf/tokens_per_s": 12345.6, "params/total": 787072.0, "val/loss": 3.75}


def result(name: str, curve=((0, 7.6), (50, 5.1), (100, 4.4)), **metrics) -> StepResult:
    return StepResult(name, "pretrain", name[0] * 64, None, {"model": "model"}, {**METRICS, **metrics},
                      {"curve": [list(p) for p in curve] if curve else None})


def spec_of(**fields):
    from schemas.steps.compare import CompareSpec

    return CompareSpec.model_validate({"kind": "compare", "steps": ["lstm", "llama"], **fields})


def test_the_table_and_the_figure_hold_each_step_s_own_numbers(tmp_path):
    from components import compare

    upstream = {"lstm": result("lstm", **{"val/perplexity": 61.25}), "llama": result("llama")}
    spec = spec_of()
    ctx = make_ctx(tmp_path, name="compare", kind="compare", upstream=upstream)
    out = compare.run(spec, ctx)
    check_contract(spec, out)
    assert out.info["table"] == [{"step": "lstm", "kind": "pretrain", "val/perplexity": 61.25,
                                  "perf/tokens_per_s": 12345.6, "params/total": 787072.0},
                                 {"step": "llama", "kind": "pretrain", "val/perplexity": 42.5,
                                  "perf/tokens_per_s": 12345.6, "params/total": 787072.0}]
    table = (ctx.out_dir / "comparison.md").read_text().splitlines()
    assert table[0] == "| step | kind | val/perplexity | perf/tokens_per_s | params/total |"
    assert table[2] == "| lstm | pretrain | 61.25 | 12,346 | 787,072 |"
    assert json.loads((ctx.out_dir / "comparison.json").read_text()) == out.info["table"]
    assert (ctx.out_dir / "comparison.png").stat().st_size > 5000


def test_a_metric_or_curve_a_step_lacks_is_an_error_naming_it(tmp_path):
    from components import compare

    upstream = {"lstm": result("lstm"), "llama": result("llama", curve=None)}
    ctx = make_ctx(tmp_path, name="compare", kind="compare", upstream=upstream)
    with pytest.raises(ValueError, match=r"compare.metrics: step 'lstm' \(pretrain\) reported no val/accuracy; it "
                                         r"reported: params/total, perf/tokens_per_s, val/loss, val/perplexity"):
        compare.run(spec_of(metrics=["val/accuracy"]), ctx)
    with pytest.raises(ValueError, match=r"compare.curve: step 'llama' \(pretrain\) recorded no held-out loss curve"):
        compare.run(spec_of(), ctx)
    compare.run(spec_of(curve="none"), ctx)  # the table alone needs no curve
    assert not (ctx.out_dir / "comparison.png").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_the_course_sequences_spec_runs_end_to_end(tmp_path, monkeypatch):
    """specs/course/sequences.yaml as a user runs it, each training cut to 4 steps."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import cut_training, run_shipped_spec, step_result

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    families = ["mlp", "rnn", "lstm", "llama"]
    run_shipped_spec(tmp_path, "course/sequences.yaml", cut_training(families))

    rows = step_result(tmp_path, "compare")["info"]["table"]
    assert [r["step"] for r in rows] == families and all(r["val/perplexity"] > 1 for r in rows)
    assert 0.95 < min(r["params/total"] for r in rows) / max(r["params/total"] for r in rows)  # within 5%
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sequences")
    [run] = client.search_runs(experiment.experiment_id, "tags.`llmcycle.step` = 'compare'")
    assert {"comparison.png", "comparison.md", "comparison.json"} <= {a.path for a in client.list_artifacts(
        run.info.run_id)}


def test_the_compared_steps_are_its_dependencies(write_spec):
    import schemas

    text = """
name: cmp
steps:
  tokenizer: {kind: tokenize, corpus: {builtin: pydoc}}
  a: {kind: pretrain, tokenizer: tokenizer, model: {family: rnn}}
  b: {kind: pretrain, tokenizer: tokenizer, model: {family: lstm}}
  both: {kind: compare, steps: [a, b]}
"""
    loaded = schemas.load(write_spec(text))
    assert schemas.dependencies(loaded.spec, "both") == ["a", "b"]
    with pytest.raises(schemas.SpecError, match="steps names a twice"):
        schemas.load(write_spec(text.replace("[a, b]", "[a, b, a]")))
    with pytest.raises(schemas.SpecError, match="no step named 'c'"):
        schemas.load(write_spec(text.replace("[a, b]", "[a, c]")))
