"""evaluate: held-out scoring, masked accuracy, prompted tasks (zero/few-shot, JSONL, builtin), decoding, embeddings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import check_contract, make_ctx
from schemas.steps.evaluate import EvaluateSpec


def evaluate(tmp_path, upstream, **kw):
    from components import evaluate as component
    from schemas.steps.evaluate import EvaluateSpec

    spec = EvaluateSpec(kind="evaluate", **kw)
    ctx = make_ctx(tmp_path, name="eval", kind="evaluate", upstream=upstream)
    return ctx, component.run(spec, ctx)


def test_scores_every_held_out_token_of_the_first_windows_and_every_text_token(tmp_path, tokenized, tiny_lm):
    from components.lib import scoring
    from components.lib.models import load_model

    text = "The if statement is used for conditional execution."
    spec_kw = dict(model=str(tiny_lm), tokens="tokenizer", context=64, batch_size=4, max_batches=2, texts=[text])
    ctx, out = evaluate(tmp_path, {"tokenizer": tokenized}, **spec_kw)
    m = out.metrics
    check_contract(EvaluateSpec(kind="evaluate", **spec_kw), out)
    assert json.loads((ctx.out_dir / "metrics.json").read_text()) == m
    model, tok = load_model(tiny_lm)
    windows = scoring.heldout_windows(tokenized.path("tokens"), tok, 64, limit=8)
    assert m["val/tokens"] == sum(len(w.targets) for w in windows)  # 2 batches x 4 windows, all their tokens
    assert m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]))
    assert 0 <= m["val/next_token_top1"] <= m["val/next_token_top5"] <= 1
    assert 100 < m["val/perplexity"] < 2000  # an untrained model is close to uniform over 512 tokens
    assert m["texts/tokens"] == len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # and its EOS


def test_masked_model_reports_masked_token_accuracy(tmp_path, tokenized):
    from components.lib.models import build_model, load_tokenizer
    from schemas.steps.pretrain import ModelSpec

    tok = load_tokenizer(str(tokenized.path("tokenizer")))
    folder = tmp_path / "bert"
    build_model(ModelSpec(family="bert", layers=1, hidden=32, heads=2, context=64), tok, "masked").save_pretrained(folder)
    tok.save_pretrained(folder)
    _, out = evaluate(tmp_path, {"tokenizer": tokenized}, model=str(folder), tokens="tokenizer", max_batches=2)
    m = out.metrics
    assert 0 <= m["val/masked_accuracy"] <= m["val/masked_top5"] <= 1
    assert m["val/tokens"] == pytest.approx(0.15 * 16 * 64, rel=0.3)


def test_prompted_tasks_choice_exact_match_and_few_shot(tmp_path, tokenized, tiny_lm):
    from components.lib.evaluation import continuation_logprob
    from components.lib.models import load_model

    (tmp_path / "arith.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1 + 1 =", "answer": " 2"}, {"prompt": "2 + 2 =", "answer": " 4"},
        {"prompt": "3 + 3 =", "answer": " 6"}]))
    choice = {"name": "colour", "type": "choice", "examples": [
        {"prompt": "The sky is", "choices": [" blue", " loud"], "answer": " blue"},
        {"prompt": "Grass is", "choices": [" green", " square"], "answer": " green"},
        {"prompt": "Snow is", "choices": [" white", " angry"], "answer": " white"}]}
    exact = {"name": "arith", "type": "exact_match", "file": "arith.jsonl", "max_new_tokens": 4}
    ctx, out = evaluate(tmp_path, {}, model=str(tiny_lm), tasks={"items": [choice, exact], "shots": 1})
    rows = [json.loads(line) for line in (ctx.out_dir / "tasks.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"colour", "arith"} and len(rows) == 6
    assert out.metrics["tasks/1shot/accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 6)
    # the choice picked is the one with the highest log-likelihood after the one-shot prefix
    model, tok = load_model(tiny_lm)
    prefix = "Grass is green\n\n"  # shot = the next example, never the question itself
    scores = {c: continuation_logprob(model, tok, prefix + "The sky is", c) for c in (" blue", " loud")}
    assert rows[0]["prediction"] == max(scores, key=scores.get)
    assert rows[0]["correct"] == (rows[0]["prediction"] == " blue")


def test_builtin_task_mixture(tmp_path, tiny_lm):
    pytest.importorskip("components.lib.tasks")
    from components.lib import tasks

    _, out = evaluate(tmp_path, {}, model=str(tiny_lm), tasks={"builtin": "tasks", "n_per_task": 2, "shots": 2})
    assert {f"tasks/2shot/{t}" for t in tasks.TASKS} | {"tasks/2shot/accuracy"} <= set(out.metrics)


def test_generation_table_and_embeddings(tmp_path, tiny_lm):
    from components.lib.models import load_model

    model, tok = load_model(tiny_lm)
    ids = tok(" the", add_special_tokens=False)["input_ids"]
    twin = 300  # make token 300 point the same way as " the": it must come out as the nearest neighbour
    with torch.no_grad():
        model.get_input_embeddings().weight[twin] = 3 * model.get_input_embeddings().weight[ids[0]]
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ctx, _ = evaluate(tmp_path, {}, model=str(folder),
                      generation={"prompts": ["The for", "A class"], "max_new_tokens": 5},
                      embeddings={"words": ["the"], "k": 3, "plot_tokens": 50})
    gen = [json.loads(line) for line in (ctx.out_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["strategy"] for g in gen] == [s for s in ("greedy", "sample", "top_k", "top_p", "beam") for _ in (0, 1)]
    near = [json.loads(line) for line in (ctx.out_dir / "neighbours.jsonl").read_text().splitlines()]
    assert near[0]["token_id"] == twin and near[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert (ctx.out_dir / "embeddings.png").stat().st_size > 1000


def test_tasks_on_a_masked_model_say_so(tmp_path, tokenized):
    from components.lib.models import build_model, load_tokenizer
    from schemas.steps.pretrain import ModelSpec

    tok = load_tokenizer(str(tokenized.path("tokenizer")))
    folder = tmp_path / "bert"
    build_model(ModelSpec(family="bert", layers=1, hidden=32, heads=2), tok, "masked").save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match="is a masked LM: generation needs a causal model"):
        evaluate(tmp_path, {}, model=str(folder), generation={"prompts": ["x"]})
    with pytest.raises(ValueError, match="is a masked LM: generation, references and lm_eval need a causal model"):
        evaluate(tmp_path, {}, model=str(folder), generation={"prompts": ["x"]}, references={"builtin": "tasks"},
                 lm_eval={"tasks": ["llmcycle"]})
