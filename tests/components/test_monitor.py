"""monitor: same-distribution data passes; renamed/re-typed fields, foreign text and gibberish are reported by name."""

from __future__ import annotations

import json
import random

import pytest

from components import monitor
from schemas.steps.monitor import MonitorSpec
from tests.conftest import check_contract, make_ctx


@pytest.fixture(scope="module")
def pydoc_lm(tiny_lm, tokenized, tmp_path_factory):
    """The tiny model after 60 AdamW steps on the pydoc tokens: it now knows what pydoc text looks like."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.lib.tokens import read_tokens

    train = read_tokens(tokenized.path("tokens"), "train")
    tokens = torch.from_numpy(train[:len(train) // 64 * 64].astype("int64")).view(-1, 64)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = tokens[torch.randint(0, len(tokens), (8,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("pydoc_lm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def pydoc_rows(start, stop):
    from pydoc_data.topics import topics

    return [{"text": topics[k], "source": k} for k in sorted(topics)[start:stop]]


def check(tmp_path, model, data_rows, **fields):
    write_jsonl(tmp_path / "reference.jsonl", pydoc_rows(0, 40))
    write_jsonl(tmp_path / "new.jsonl", data_rows)
    spec = MonitorSpec(kind="monitor", model=str(model), data={"files": ["new.jsonl"]},
                       reference={"files": ["reference.jsonl"]}, context=64, windows=8, **fields)
    ctx = make_ctx(tmp_path, name="drift", kind="monitor")
    out = monitor.run(spec, ctx)
    check_contract(spec, out)
    return out, ctx


def test_same_distribution_passes(tmp_path, pydoc_lm):
    out, ctx = check(tmp_path, pydoc_lm, pydoc_rows(40, 70))
    m = out.metrics
    assert out.info["findings"] == [] and m["schema/errors"] == 0
    assert m["drift/js_divergence"] < 0.1 and m["drift/perplexity_ratio"] < 1.3
    assert (ctx.out_dir / "report.md").read_text().startswith("# Drift report")


def test_drift_is_reported_by_name_and_fails(tmp_path, pydoc_lm):
    rng = random.Random(0)
    rows = pydoc_rows(40, 60)
    rows += [{"body": r["text"], "source": r["source"]} for r in pydoc_rows(60, 65)]  # a renamed field
    rows += [{"text": 12345, "source": "ids"}] * 3  # a re-typed field
    greek = "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. "
    rows += [{"text": greek * 20, "source": "el"}] * 10
    rows += [{"text": " ".join("".join(rng.choice("qxzjvkw") for _ in range(7)) for _ in range(300)),
              "source": "noise"} for _ in range(10)]
    out, _ = check(tmp_path, pydoc_lm, rows, on_drift="warn")
    m, findings = out.metrics, out.info["findings"]
    assert m["schema/errors"] == 8
    report = (tmp_path / "drift" / "out" / "report.md").read_text()
    assert "field 'text' missing in 5 of 48 rows (first: new.jsonl:21); new field 'body' in as many rows: renamed?" in report
    assert "field 'text' should be string but is integer in 3 of 48 rows (first: new.jsonl:26, value 12345)" in report
    assert m["drift/unknown_rate"] > 0.05 > m["drift/reference_unknown_rate"]
    assert m["drift/js_divergence"] > 0.2 and m["drift/perplexity_ratio"] > 1.5
    assert len(findings) == 4 and m["drift/findings"] == 4

    with pytest.raises(RuntimeError, match=r"drift: 8 rows break the schema \(limit 0\); unknown-token rate"):
        check(tmp_path, pydoc_lm, rows)


def test_shipped_monitor_spec_data_and_nightly_deployment(tmp_path):
    import yaml

    import schemas
    from tests.conftest import REPO

    loaded = schemas.load(REPO / "specs" / "monitor.yaml")
    step = loaded.spec.steps["drift"]
    assert step.model == "models:/quickstart-lm@champion"
    ctx = make_ctx(tmp_path, base_dir=loaded.base_dir)
    rows, texts = monitor.read_source(step.data, ctx, step.sample)
    assert len(texts) == len(rows) > 10 and monitor.check_schema(rows, step.fields)["errors"] == 0
    [deployment] = [d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                    if d["name"] == "monitor"]
    assert deployment["parameters"] == {"spec_path": "specs/monitor.yaml", "force": ["drift"]}
    assert deployment["entrypoint"] == "flows/pipeline.py:run_pipeline" and deployment["schedules"][0]["cron"]


def test_compares_with_the_registered_versions_own_validation_perplexity(tmp_path, pydoc_lm):
    from mlflow.tracking import MlflowClient

    from components import register
    from components.lib.context import StepResult
    from schemas.steps.register import RegisterSpec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("m", artifact_location=(tmp_path / "artifacts").as_uri())
    evaluation = StepResult("base_eval", "evaluate", "e" * 64, tmp_path, {}, {"val/perplexity": 50.0})
    ctx = make_ctx(tmp_path, name="release", kind="register", upstream={"base_eval": evaluation})
    ctx.tracking_uri, ctx.run_id = uri, client.create_run(experiment).info.run_id
    register.run(RegisterSpec(kind="register", model=str(pydoc_lm), name="lm", evidence=["base_eval"]), ctx)

    write_jsonl(tmp_path / "new.jsonl", pydoc_rows(40, 50))
    common = dict(kind="monitor", model="models:/lm@champion", data={"files": ["new.jsonl"]},
                  reference={"builtin": "pydoc"}, sample=20, context=64, windows=4, on_drift="warn")
    ctx = make_ctx(tmp_path, name="drift", kind="monitor")
    ctx.tracking_uri = uri
    out = monitor.run(MonitorSpec(**common, validation_perplexity="base_eval.val/perplexity"), ctx)
    assert out.metrics["drift/reference_perplexity"] == 50.0
    assert out.metrics["drift/perplexity_ratio"] == pytest.approx(out.metrics["drift/perplexity"] / 50.0)
    with pytest.raises(ValueError, match=r"has no tag metric.base_eval.val/ppl; its metric tags: base_eval.val/perplexity"):
        monitor.run(MonitorSpec(**common, validation_perplexity="base_eval.val/ppl"), ctx)
