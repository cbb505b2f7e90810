"""llmcycle's decoding loop (components/lib/decoding.py) against transformers' `generate`: the same tokens."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The for statement", "A class definition is", "x", "The import system of the language"]


@pytest.fixture(scope="module")
def tok(tokenized):
    from components.lib.models import load_tokenizer

    return load_tokenizer(tokenized.path("tokenizer"))


def tiny(family: str, tok, sharpen: float = 8.0):
    from components.lib.models import build_model
    from schemas.steps.pretrain import ModelSpec

    torch.manual_seed(0)
    heads = {"heads": 4} if family in ("llama", "gpt2") else {}
    model = build_model(ModelSpec(family=family, layers=2, hidden=64, context=128, **heads), tok, "causal").eval()
    if family in ("llama", "gpt2"):
        with torch.no_grad():  # sharpen the random model so that its greedy choices are not near-ties
            model.get_output_embeddings().weight.mul_(sharpen)
    return model


def config(tok, sample: bool = False, new: int = 10, **extra):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new, do_sample=sample, temperature=0.7 if sample else 1.0, top_k=0,
                            top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)


def plain(model, batch, cfg, seed: int = 0, stop=None):
    from components.lib.decoding import Plan, plain_generate

    torch.manual_seed(seed)
    with torch.inference_mode():
        return plain_generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop, Plan("generate", None, False))


def ours(model, batch, cfg, seed: int = 0, stop=None, **choices):
    from components.lib.decoding import Decoder

    torch.manual_seed(seed)
    with torch.inference_mode():
        return Decoder(**choices).generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop)


@pytest.mark.parametrize("family", ["llama", "gpt2", "rnn"])
def test_greedy_outputs_equal_plain_generate_for_every_cache(family, tok):
    from components.lib.decoding import Decoder
    from components.lib.generation import encode_prompts

    model = tiny(family, tok)
    for prompts in (PROMPTS, PROMPTS[:1]):  # left-padded, and unpadded (generate drops an all-ones mask)
        batch = encode_prompts(tok, prompts)
        want = plain(model, batch, config(tok))
        for cache in ("auto", "dynamic", "static"):
            assert torch.equal(ours(model, batch, config(tok), cache=cache), want), (family, cache, len(prompts))
    path = Decoder().plan(model, config(tok), torch.device("cpu")).path
    assert path == ("generate" if family == "rnn" else "loop")  # the rnn keeps its own state: transformers' path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampling_under_a_seed_draws_what_generate_draws(family, tok):
    from components.lib.generation import encode_prompts

    model = tiny(family, tok, sharpen=1.0)  # a spread-out distribution: the draws decide
    batch = encode_prompts(tok, PROMPTS)
    want = plain(model, batch, config(tok, sample=True), seed=3)
    assert torch.equal(ours(model, batch, config(tok, sample=True), seed=3), want)
    assert torch.equal(ours(model, batch, config(tok, sample=True), seed=3, cache="static"), want)
    assert not torch.equal(ours(model, batch, config(tok, sample=True), seed=4), want)  # the seed matters


def test_stop_tokens_and_min_new_tokens_end_rows_as_generate_does(tok):
    from components.lib.generation import encode_prompts

    model = tiny("llama", tok)
    batch = encode_prompts(tok, PROMPTS)
    width = batch["input_ids"].shape[1]
    free = plain(model, batch, config(tok, new=12))
    stop = [int(free[0, width + 2]), int(free[2, width + 4])]  # tokens the model emits: rows end early
    want = plain(model, batch, config(tok, new=12), stop=stop)
    got = ours(model, batch, config(tok, new=12), stop=stop)
    assert torch.equal(got, want)
    row = got[0, width:].tolist()
    assert row.index(stop[0]) <= 2 and set(row[row.index(stop[0]) + 1:]) <= {tok.pad_token_id}  # pad after the stop
    as_eos = config(tok, new=12, min_new_tokens=5)
    as_eos.eos_token_id = stop[0]  # EOS masked for the first 5 tokens, as MinNewTokensLengthLogitsProcessor does
    assert torch.equal(ours(model, batch, as_eos), plain(model, batch, as_eos))


def test_what_the_loop_does_not_implement_goes_to_generate(tok):
    from components.lib.decoding import Decoder

    model = tiny("llama", tok)
    cpu = torch.device("cpu")
    assert "top_k" in Decoder().plan(model, _with(config(tok, sample=True), top_k=5), cpu).why
    assert Decoder().plan(model, _with(config(tok), num_beams=3), cpu).path == "generate"
    assert Decoder().plan(model, _with(config(tok), repetition_penalty=1.3), cpu).path == "generate"
    cuda = Decoder().plan(model, config(tok), torch.device("cuda"))  # transformers' static cache + compile there
    assert (cuda.path, cuda.cache, cuda.compile) == ("generate", "static", True)
    assert not Decoder(compile=False).plan(model, config(tok), torch.device("cuda")).compile
    assert Decoder().plan(model, config(tok), cpu) == Decoder().plan(model, config(tok), cpu)
    assert not Decoder().plan(model, config(tok), cpu).compile  # auto never compiles on a CPU
    with pytest.raises(ValueError, match="generation.cache"):
        Decoder(cache="paged")


def _with(cfg, **fields):
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


def test_the_loop_counts_the_tokens_generate_counts(tok):
    from components.lib import meter
    from components.lib.generation import encode_prompts

    meter.reset()  # forgets the meters of earlier models: this one's is the only one
    model = tiny("llama", tok)
    batch = encode_prompts(tok, PROMPTS)
    plain(model, batch, config(tok))
    [once] = meter.measured()
    ours(model, batch, config(tok))
    [twice] = meter.measured()
    assert twice["inference_tokens"] == 2 * once["inference_tokens"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "lstm"])
def test_answers_batched_with_left_padding_equal_answers_one_by_one(family, tok):
    from components.lib.generation import generate_answers
    from components.lib.tasks import make_examples

    model = tiny(family, tok)
    prompts = [r["prompt"] for r in make_examples(0, "eval", 2)]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 3  # several lengths: the batches need padding
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, one_line=False)
    assert batched == [generate_answers(model, tok, [p], max_new_tokens=6, one_line=False)[0] for p in prompts]


def test_answer_batches_sort_by_length_or_keep_one_length_per_batch():
    from components.lib.generation import answer_batches

    rows = [[1] * n for n in (3, 1, 2, 1, 3, 2)]
    assert answer_batches(rows, 4, pad_left=True) == [[1, 3, 2, 5], [0, 4]]
    assert answer_batches(rows, 4, pad_left=False) == [[1, 3], [2, 5], [0, 4]]


def test_generation_settings_validate_and_merge_field_by_field():
    from pydantic import ValidationError

    from schemas.resources import TrainerSpec, resources_for

    with pytest.raises(ValidationError, match="compile: true needs a static cache"):
        TrainerSpec.model_validate({"generation": {"cache": "dynamic", "compile": True}})
    pipeline = TrainerSpec.model_validate({"generation": {"cache": "static"}})
    step = TrainerSpec.model_validate({"generation": {"compile": False}})
    merged = resources_for(pipeline, step).generation
    assert (merged.cache, merged.compile) == ("static", False)
    assert resources_for(pipeline, None).generation.compile == "auto"


def test_rollouts_with_repeated_and_ragged_prompts_draw_what_generate_draws(tok):
    """grpo's G copies per prompt are prefilled once, ragged prompts in length groups: the same tokens."""
    from components.lib.decoding import Decoder, prefill_groups
    from components.lib.rollout import encode_prompts
    from components.lib.tasks import make_examples

    model = tiny("llama", tok, sharpen=1.0)
    rows = make_examples(0, "train", 4)[:16]
    for batch_rows in (rows, [r for r in rows[:4] for _ in range(4)]):
        query, mask = encode_prompts(tok, batch_rows, 128)
        lengths = mask.sum(1).tolist()
        assert len(prefill_groups(lengths, query.shape[1])) > 1 or len(set(map(tuple, query.tolist()))) < 16
        batch = {"input_ids": query, "attention_mask": mask}
        for sample in (False, True):
            want = plain(model, batch, config(tok, sample=sample, new=8), seed=2)
            for cache in ("dynamic", "static"):
                got = ours(model, batch, config(tok, sample=sample, new=8), seed=2, cache=cache)
                assert torch.equal(got, want), (cache, sample)
    assert Decoder().plan(model, config(tok), torch.device("cpu")).cache == "dynamic"  # uncompiled: dynamic


def test_prefill_groups_cut_padding_only_when_it_pays():
    from components.lib.decoding import prefill_groups

    assert prefill_groups([10] * 16, 10) == [list(range(16))]  # no padding to save: one forward
    lengths = [2] * 8 + [40] * 8
    groups = prefill_groups(lengths, 40)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(16))
    assert all(len({lengths[i] for i in g}) == 1 for g in groups)  # short rows apart from long ones
