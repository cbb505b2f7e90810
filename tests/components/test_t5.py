"""Encoder-decoders: T5's span corruption, a tiny t5 pretrained, fine-tuned, evaluated and registered, its spec
errors, and specs/course/transformer-types.yaml end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from components.lib import span_corruption as sc
from tests.conftest import check_contract, finish, make_ctx

TINY_T5 = {"family": "t5", "layers": 1, "hidden": 32, "heads": 2, "context": 32}
SENTINELS = list(range(1000, 1100))
EOS = 1


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def by_hand(length: int, seed: int, density: float = 0.15, mean: float = 3.0) -> np.ndarray:
    """T5's mask written the long way: draw the two segmentations as T5 does (a shuffle of the segment starts,
    noise first), then lay the non-noise and noise spans end to end, non-noise first."""
    rng = np.random.default_rng(seed)
    noise = min(max(round(length * density), 1), length - 1)
    count = max(round(noise / mean), 1)

    def lengths(items: int) -> list[int]:
        starts = (np.arange(items - 1) < count - 1).astype(np.int64)
        rng.shuffle(starts)
        cuts = [0] + [i + 1 for i in np.flatnonzero(starts)] + [items]
        return [b - a for a, b in zip(cuts, cuts[1:])]

    noise_lengths, kept_lengths = lengths(noise), lengths(length - noise)
    return np.array(sum(([False] * k + [True] * n for k, n in zip(kept_lengths, noise_lengths)), []))


@pytest.mark.parametrize("length", [20, 37, 100, 141, 568])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_noise_mask_has_t5s_density_and_span_count(length, seed):
    mask = sc.random_spans_noise_mask(length, 0.15, np.random.default_rng(seed))
    noise = round(length * 0.15)
    assert mask.shape == (length,) and mask.sum() == noise
    assert len(spans(mask)) == max(round(noise / 3), 1)
    assert not mask[0] and mask[-1]  # non-noise first, noise last (T5 without random_roll)
    np.testing.assert_array_equal(mask, by_hand(length, seed))


def test_the_noise_mask_in_cases_worked_by_hand():
    # 20 tokens: round(3.0) = 3 noise tokens in round(3 / 3) = 1 span, which T5 puts at the end
    for seed in range(5):
        assert sc.random_spans_noise_mask(20, 0.15, np.random.default_rng(seed)).tolist() == [False] * 17 + [True] * 3
    assert sc.random_spans_noise_mask(1, 0.15, np.random.default_rng(0)).tolist() == [False]  # degenerate: padded to 2
    assert sc.random_spans_noise_mask(2, 0.15, np.random.default_rng(0)).tolist() == [False, True]
    # T5's encoder length 512 reads 568 raw tokens and writes 114 targets (its random_spans_helper); ours 128 -> 141
    assert sc.random_spans_helper(512) == (568, 114) and sc.random_spans_helper(128) == (141, 29)


@pytest.mark.parametrize("length", [1, 2, 5, 64, 141])
def test_inputs_and_targets_rebuild_the_block_exactly(length):
    rng = np.random.default_rng(length)
    block = rng.integers(3, 999, size=length)
    mask = sc.random_spans_noise_mask(length, 0.15, rng)
    inputs, targets = sc.corrupt(block, mask, SENTINELS, EOS)
    assert sc.uncorrupt(inputs, targets, SENTINELS, EOS) == block.tolist()
    n, kept = len(spans(mask)), len(spans(~mask))  # equal but for a 1-token block, which has no noise
    assert inputs[-1] == EOS and targets[-1] == EOS
    assert [t for t in inputs if t in SENTINELS] == SENTINELS[:n]
    assert [t for t in targets if t in SENTINELS] == SENTINELS[:kept]
    assert len(inputs) == length - mask.sum() + n + 1 and len(targets) == mask.sum() + kept + 1
    if length > 2:
        assert targets[0] == SENTINELS[0]  # the targets open with <extra_id_0>, then the first dropped span
    if length == 141:
        assert len(inputs) == 128  # random_spans_helper's length fills a 128-token encoder exactly


def test_sentinels_join_the_tokenizer_as_t5s_do(tokenized, tmp_path):
    from transformers import AutoTokenizer

    from components.lib.models import load_tokenizer, save_tokenizer

    tok = load_tokenizer(tokenized.path("tokenizer"))
    before = len(tok)
    ids = sc.add_sentinels(tok, 100)
    assert len(tok) == before + 100 and ids == [before + 99 - i for i in range(100)]  # <extra_id_0> last
    assert sc.add_sentinels(tok, 100) == ids and len(tok) == before + 100  # idempotent
    save_tokenizer(tok, tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert sc.sentinel_ids(again) == ids and set(ids) <= set(again.all_special_ids)
    assert again.decode([5, ids[0], 6], skip_special_tokens=True) == again.decode([5, 6])


def test_span_corruption_fits_only_t5_and_t5_only_span_corruption(write_spec):
    import schemas
    from schemas.steps.pretrain import PretrainSpec

    def spec(**kw):
        return PretrainSpec.model_validate({"kind": "pretrain", "tokenizer": "t", **kw})

    with pytest.raises(ValueError, match=r"model.family 'llama' does not fit objective 'span_corruption'; .*"
                                         r"span_corruption takes t5"):
        spec(model={"family": "llama"}, objective="span_corruption")
    with pytest.raises(ValueError, match=r"model.family 't5' does not fit objective 'causal'"):
        spec(model={"family": "t5"})
    with pytest.raises(ValueError, match=r"model.family 't5' does not fit objective 'masked'"):
        spec(model={"family": "t5"}, objective="masked")
    with pytest.raises(ValueError, match=r"noise_density: objective span_corruption only, not 'causal'"):
        spec(model={"family": "llama"}, noise_density=0.3)
    with pytest.raises(ValueError, match=r"sizing counts .* 't5' has an encoder and a decoder"):
        spec(model={"family": "t5"}, objective="span_corruption", sizing={"tokens": 1e6}, max_steps=None)
    with pytest.raises(ValueError, match=r"noise_density\s+Input should be less than or equal to 0.5"):
        spec(model={"family": "t5"}, objective="span_corruption", noise_density=0.6)

    text = """
name: seq2seq
steps:
  tokenizer: {kind: tokenize, corpus: {builtin: pydoc}, val_fraction: 0.1}
  t5: {kind: pretrain, tokenizer: tokenizer, model: {family: t5}, objective: span_corruption}
  sft: {kind: finetune, model: t5, data: {builtin: tasks}}
  release: {kind: register, model: sft, name: t5-lm}
"""
    schemas.load(write_spec(text))  # finetune and register take an encoder-decoder
    causal_only = text + "  small: {kind: optimize, model: sft}\n"  # its latency and int8 paths are causal
    with pytest.raises(schemas.SpecError, match=r"step 'sft' \(finetune\) makes an encoder-decoder \(t5\); this field "
                                                r"needs a causal LM"):
        schemas.load(write_spec(causal_only))


@pytest.fixture(scope="module")
def t5_pretrained(tokenized, tmp_path_factory):
    """A tiny t5 pretrained with span corruption: (spec, output, its StepResult)."""
    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec

    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", model=TINY_T5, objective="span_corruption",
                        max_steps=24, val_every=12, batch_size=8, val_batches=2, checkpoint_every=24,
                        optimizer={"lr": 1e-2}, schedule={"warmup_steps": 4}, log_model=False)
    ctx = make_ctx(tmp_path_factory.mktemp("t5"), name="t5", kind="pretrain", upstream={"tokenizer": tokenized})
    out = pretrain.run(spec, ctx)
    return spec, out, finish(ctx, out)


def test_t5_pretrain_s_held_out_span_loss_falls_and_the_folder_is_plain_t5(t5_pretrained, tokenized, tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from components import evaluate
    from components.lib.models import load_model
    from schemas.steps.evaluate import EvaluateSpec

    spec, out, result = t5_pretrained
    m = out.metrics
    check_contract(spec, out)
    assert m["val/loss"] < m["before/val/loss"] - 0.5, m
    assert m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]))
    assert m["train/tokens"] == 24 * 8 * sc.tokens_length(32)  # raw tokens: 34 per block for a 32-token encoder
    assert [s for s, _ in out.info["curve"]] == [0, 12, 24]

    folder = result.path("model")
    model = T5ForConditionalGeneration.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_layers == model.config.num_decoder_layers == 1 and model.config.d_model == 32
    assert len(sc.sentinel_ids(tok)) == 100 and model.config.vocab_size == len(tok)
    assert type(load_model(folder)[0]).__name__ == type(load_model(folder, "auto")[0]).__name__ == \
        "T5ForConditionalGeneration"

    upstream = {"t5": result, "tokenizer": tokenized}
    ev = EvaluateSpec(kind="evaluate", model="t5", tokens="tokenizer", max_batches=2, context=32,
                      texts=["The for statement iterates over the items of any sequence."],
                      generation={"prompts": ["The <extra_id_0> statement"], "strategies": ["greedy", "beam"],
                                  "max_new_tokens": 6})
    scored = evaluate.run(ev, make_ctx(tmp_path, name="ev", kind="evaluate", upstream=upstream))
    check_contract(ev, scored, {"t5": spec, "tokenizer": None})
    assert scored.info["objective"] == "span_corruption"
    assert abs(scored.metrics["val/loss"] - m["val/loss"]) < 0.5  # the same objective on other masks
    assert 0 < scored.metrics["val/span_top1"] <= scored.metrics["val/span_top5"] <= 1


def test_finetune_t5_with_lora_learns_and_the_folders_load_and_generate(t5_pretrained, tokenized, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from components import finetune
    from components.lib import evaluation, seq2seq
    from components.lib.tasks import make_examples
    from schemas.steps.finetune import FinetuneSpec

    _, _, base = t5_pretrained
    rows = make_examples(0, "train", 16, ["copy"])
    tok = AutoTokenizer.from_pretrained(base.path("model"))

    def completion_loss(model) -> float:
        batch = sc.collate_pairs(seq2seq.encode_rows(rows, tok, 64), tok.pad_token_id)
        with torch.no_grad():
            return float(model.eval()(**batch).loss)

    spec = FinetuneSpec.model_validate({
        "kind": "finetune", "model": "t5", "tokens": "tokenizer", "replay": 0.2,
        "data": {"builtin": "tasks", "tasks": ["copy", "sentiment"], "n_per_task": 24, "eval_per_task": 3},
        "peft": {"method": "lora", "r": 8}, "evaluation": {"shots": 0, "perplexity_batches": 1},
        "max_steps": 16, "batch_size": 8, "val_every": 8, "val_batches": 1, "optimizer": {"lr": 2e-2}})
    ctx = make_ctx(tmp_path, name="sft", kind="finetune", upstream={"t5": base, "tokenizer": tokenized})
    out = finetune.run(spec, ctx)
    check_contract(spec, out, {"t5": t5_pretrained[0]})
    result = finish(ctx, out)
    config = json.loads((result.path("adapter") / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    assert 0 < out.metrics["params/trainable"] < out.metrics["params/total"]
    assert "forgetting/perplexity_delta" in out.metrics and "tasks/0shot/sentiment" in out.metrics

    plain = T5ForConditionalGeneration.from_pretrained(base.path("model"))
    merged = T5ForConditionalGeneration.from_pretrained(result.path("model"))
    assert completion_loss(merged) < completion_loss(plain) - 0.3
    adapted = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base.path("model")),
                                        result.path("adapter")).eval()
    ids = torch.tensor([tok.encode("copy: a b c", add_special_tokens=False)])
    with torch.no_grad():
        kwargs = {"input_ids": ids, "decoder_input_ids": torch.tensor([[tok.pad_token_id, 5, 6]])}
        torch.testing.assert_close(merged.eval()(**kwargs).logits, adapted(**kwargs).logits, atol=1e-5, rtol=1e-5)
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 1 and generated[0, 0] == merged.config.decoder_start_token_id

    # choice log-likelihood: the decoder's summed log-probability of the choice, the prompt in the encoder
    prompt, choice = "copy: a b c\n", " a b c"
    n = len(tok.encode(choice, add_special_tokens=False))
    with torch.no_grad():
        loss = merged(input_ids=ids, labels=torch.tensor([tok.encode(choice, add_special_tokens=False)])).loss
    got = evaluation.continuation_logprob(merged, tok, prompt.rstrip("\n"), choice)
    assert got == pytest.approx(-float(loss) * n, rel=1e-4)


def test_a_t5_registers_as_a_generator_that_loads_back(t5_pretrained, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import T5ForConditionalGeneration

    from components import register
    from components.lib.registry import download_mlflow_model, download_registered
    from schemas.steps.register import RegisterSpec

    _, _, base = t5_pretrained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("seq2seq", artifact_location=(tmp_path / "artifacts").as_uri())
    spec = RegisterSpec(kind="register", model="t5", name="tiny-t5")
    ctx = make_ctx(tmp_path, name="release", kind="register", upstream={"t5": base})
    ctx.tracking_uri, ctx.pipeline_name = uri, "seq2seq"
    ctx.run_id = client.create_run(experiment, run_name="release").info.run_id
    check_contract(spec, register.run(spec, ctx))

    folder = download_registered("models:/tiny-t5@champion", tmp_path / "cache", uri)
    ids = torch.tensor([[5, 9, 14, 1]])
    labels = torch.tensor([[7, 8, 1]])
    with torch.no_grad():
        want = T5ForConditionalGeneration.from_pretrained(base.path("model"))(input_ids=ids, labels=labels).logits
        got = T5ForConditionalGeneration.from_pretrained(folder)(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(got, want)
    # what `llmcycle serve` hands MLflow's scoring server: a pyfunc that generates from the decoder
    generator = mlflow.pyfunc.load_model(str(download_mlflow_model("models:/tiny-t5@champion", tmp_path / "cache", uri)))
    replies = generator.predict(["The for statement", "The <extra_id_0> statement"], params={"max_new_tokens": 4})
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


@pytest.mark.usefixtures("prefect_harness")
def test_the_course_transformer_types_spec_runs_end_to_end(tmp_path, monkeypatch):
    """specs/course/transformer-types.yaml as a user runs it, each training cut to 4 steps."""
    from tests.conftest import cut_training, run_shipped_spec, step_result

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trained = ["decoder", "encoder", "encoder_decoder"]
    run_shipped_spec(tmp_path, "course/transformer-types.yaml", cut_training(trained) + [
        "steps.encoder_decoder_eval.max_batches=1", "steps.encoder_decoder_eval.generation.max_new_tokens=4"])

    rows = step_result(tmp_path, "compare")["info"]["table"]
    assert [r["step"] for r in rows] == trained
    for step in trained:  # each model's held-out loss on its own objective fell
        pretrained = step_result(tmp_path, step)
        assert pretrained["metrics"]["val/loss"] < pretrained["metrics"]["before/val/loss"], step
    assert 0.95 < min(r["params/total"] for r in rows) / max(r["params/total"] for r in rows)  # within 5%
    evaluated = step_result(tmp_path, "encoder_decoder_eval")
    assert evaluated["info"]["objective"] == "span_corruption" and evaluated["metrics"]["val/loss"] > 0
    assert (next((tmp_path / "runs" / "compare").glob("*/comparison.png"))).stat().st_size > 5000
