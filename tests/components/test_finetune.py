"""The finetune step: trains on completions only, saves adapter + merged model that load, reports base vs tuned."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from components import finetune
from components.lib.text import encode_completion
from schemas.steps.finetune import FinetuneSpec
from tests.conftest import check_contract, finish, make_ctx

TINY = dict(max_steps=12, batch_size=8, val_every=6, val_batches=1, optimizer={"lr": 3e-2})


def completion_loss(model, tok) -> float:
    """Loss on completion tokens of the builtin copy/sentiment training rows."""
    from components.lib.sft import collate
    from components.lib.tasks import make_examples

    rows = make_examples(0, "train", 16, ["copy", "sentiment"])
    encoded = [encode_completion(tok, r["prompt"], r["completion"], 64) for r in rows]
    batch = collate([(p + c, [-100] * len(p) + c) for p, c in encoded], tok.pad_token_id)
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


def spec_of(**fields) -> FinetuneSpec:
    return FinetuneSpec.model_validate({"kind": "finetune", **TINY, **fields})


def test_lora_on_builtin_tasks_trains_saves_and_reports(tmp_path, tiny_lm, tokenized):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = make_ctx(tmp_path, name="sft", kind="finetune", upstream={"tokenizer": tokenized})
    spec = spec_of(model=str(tiny_lm), tokens="tokenizer", replay=0.2,
                   data={"builtin": "tasks", "tasks": ["copy", "sentiment"], "n_per_task": 32, "eval_per_task": 4},
                   peft={"method": "lora", "r": 4, "target_modules": ["all-linear"]},
                   evaluation={"shots": 1, "perplexity_batches": 1})
    out = finetune.run(spec, ctx)
    m = out.metrics
    check_contract(spec, out)
    assert 0 < m["params/trainable"] < m["params/total"]
    for key in ("before/tasks/0shot/accuracy", "tasks/1shot/copy", "forgetting/perplexity_delta",
                "gain/tasks/0shot/sentiment"):
        assert key in m
    assert json.loads((ctx.out_dir / "metrics.json").read_text())["params/trainable"] == m["params/trainable"]
    result = finish(ctx, out)
    x = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(result.path("model")).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), result.path("adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-5, rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert completion_loss(merged, tok) < completion_loss(AutoModelForCausalLM.from_pretrained(tiny_lm), tok) - 0.1
    assert AutoTokenizer.from_pretrained(result.path("model")).eos_token == "</s>"

    # the same model on the same builtin tasks: evaluate reports what finetune reported
    from components import evaluate
    from schemas.steps.evaluate import EvaluateSpec

    ev_ctx = make_ctx(tmp_path, name="ev", kind="evaluate", upstream={"sft": result})
    tasks = {"builtin": "tasks", "tasks": ["copy", "sentiment"], "n_per_task": 4, "shots": 1}
    scored = evaluate.run(EvaluateSpec(kind="evaluate", model="sft", tasks=tasks), ev_ctx).metrics
    assert {k: v for k, v in scored.items() if k.startswith("tasks/")} == \
        {k: v for k, v in m.items() if k.startswith("tasks/1shot/")}


def test_jsonl_messages_and_step_data_full_finetune(tmp_path, tiny_lm):
    from components.lib.context import StepResult

    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "never")] * 4
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    upstream = {"cai": StepResult(name="cai", kind="constitutional", fingerprint="f", dir=tmp_path,
                                  outputs={"data": "data"}, metrics={})}
    ctx = make_ctx(tmp_path, name="sft", kind="finetune", upstream=upstream)
    ctx.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(ctx.tracking_uri)
    ctx.run_id = client.create_run(client.create_experiment("ft")).info.run_id
    out = finetune.run(spec_of(model=str(tiny_lm), data={"step": "cai"}, peft={"method": "full"},
                               evaluation={"shots": 0, "base": False}), ctx)
    assert set(out.outputs) == {"model", "tokenizer", "metrics"}
    logged = {a.path for a in client.list_artifacts(ctx.run_id)}
    assert {"metrics.json", "task_predictions.json"} <= logged
    experiment = client.get_run(ctx.run_id).info.experiment_id
    assert [m.source_run_id for m in client.search_logged_models([experiment])] == [ctx.run_id]  # the model
    assert client.get_run(ctx.run_id).data.tags["llmcycle.peft_method"] == "full"
    assert out.metrics["params/trainable"] == out.metrics["params/total"]
    assert out.metrics["train/loss"] < 5.0 and "tasks/0shot/accuracy" in out.metrics


def test_completion_only_labels(tiny_lm):
    from transformers import AutoTokenizer

    from components.lib.sft import encode_rows

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    [(ids, labels)] = encode_rows([{"prompt": "Copy: cat dog\nAnswer:", "completion": " cat dog\n"}], tok, 64)
    n_prompt = len(tok("Copy: cat dog\nAnswer:", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    [(ids, labels)] = encode_rows([{"prompt": "long prompt " * 50, "completion": " yes"}], tok, 16)
    assert len(ids) == 16 and labels[-1] == tok.eos_token_id


def test_bad_data_rows_name_file_and_line(tmp_path, tiny_lm):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"text": "no"}\n')
    ctx = make_ctx(tmp_path, name="sft", kind="finetune")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected \{prompt, completion\}.*got fields text"):
        finetune.run(spec_of(model=str(tiny_lm), data={"files": ["bad.jsonl"]}), ctx)


def test_schema_rules():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of files, builtin, step"):
        spec_of(model="base", data={"builtin": "tasks", "files": ["a.jsonl"]})
    with pytest.raises(ValidationError, match="replay needs tokens"):
        spec_of(model="base", data={"builtin": "tasks"}, replay=0.1)
    with pytest.raises(ValidationError, match="prompt_tuning cannot be merged"):
        spec_of(model="base", data={"builtin": "tasks"}, peft={"method": "prompt_tuning"}, merge=True)
    assert not spec_of(model="base", data={"builtin": "tasks"}, peft={"method": "prompt_tuning"}).merged
