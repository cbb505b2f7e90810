"""Packed batches give the losses and gradients of padded ones: finetune's, reward_model's and dpo's."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from components.lib import packing
from components.lib.preferences import builtin_pairs, collate_pairs, encode_pairs
from components.lib.sft import IGNORE, collate, encode_rows
from components.lib.tasks import make_examples

TOLERANCE = 1e-5  # fp32: packing reorders no arithmetic within an example, only the padding differs


def test_best_fit_decreasing_fills_the_tightest_bin_and_places_each_item_once():
    bins = packing.best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8)
    assert sorted(itertools.chain(*bins)) == list(range(7))
    assert [sorted(b) for b in bins] == [[0, 2], [1, 3, 6], [4, 5]]  # 5+3, 4+3+1, 2+2: 8, 8, 4
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(500)]
    bins = packing.best_fit_decreasing(lengths, 64)
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 11 / 9 * (sum(lengths) / 64) + 1  # BFD's bound against the optimum's lower bound
    assert packing.best_fit_decreasing([100, 3], 10) == [[0], [1]]  # too long for any bin: a row of its own


def test_positions_restart_and_labels_never_cross_a_boundary():
    seqs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    b = packing.pack(seqs, None, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]  # the 4 would be predicted from the 3
    assert b["sequence_index"].tolist() == [[0, 0, 0, 1, 1]]
    b = packing.pack(seqs, 4, pad_id=0)  # two rows; padding is a sequence of its own (positions restart)
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert b["sequence_index"].tolist() == [[0, 0, 0], [1, 1, -1]]
    assert b["last_index"].tolist() == [[0, 2], [1, 1]]


def _models(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    yield LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256))
    yield GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**packing.model_inputs(batch)).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("capacity", [None, 96])
def test_finetune_batches_packed_or_padded_give_the_same_loss_and_gradients(tiny_lm, capacity):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    examples = encode_rows(make_examples(0, "train", 2), tok, 64)  # 16 ragged rows of the task mixture
    lengths = [len(ids) for ids, _ in examples]
    assert max(lengths) > 2 * min(lengths)
    for model in _models(len(tok)):
        padded = _loss_and_grads(model.eval(), collate(examples, tok.pad_token_id))
        packed_batch = packing.collate_sft(examples, tok.pad_token_id, capacity)
        assert packed_batch["input_ids"].numel() < len(examples) * max(lengths)
        packed = _loss_and_grads(model, packed_batch)
        assert packed[0] == pytest.approx(padded[0], rel=TOLERANCE)
        for name, grad in padded[1].items():
            assert torch.allclose(packed[1][name], grad, rtol=1e-4, atol=1e-6), name

        # and example by example: each one's summed token loss, alone versus inside the packed rows
        logits = model(**packing.model_inputs(packed_batch)).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), packed_batch["labels"][:, 1:],
                                                       reduction="none", ignore_index=IGNORE)
        per_example = packing.per_sequence_sum(token_loss, packed_batch["sequence_index"][:, 1:], len(examples))
        for i, (ids, labels) in enumerate(examples[:4]):
            alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            assert float(per_example[i]) == pytest.approx(float(alone) * sum(y != IGNORE for y in labels[1:]),
                                                          rel=TOLERANCE)


def test_pairs_packed_give_the_same_rewards_and_dpo_log_probs(tiny_lm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from components.dpo import batch_logps
    from components.lib.rewards import batch_rewards

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    items = encode_pairs(builtin_pairs(0, "train", 2), tok, 64)
    padded, packed = collate_pairs(items, tok.pad_token_id), packing.collate_pairs(items, tok.pad_token_id, None)
    assert packed["input_ids"].shape[0] == 1
    policy = next(_models(len(tok))).eval()
    with torch.no_grad():
        assert torch.allclose(batch_logps(policy, packed), batch_logps(policy, padded), rtol=TOLERANCE, atol=1e-4)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1).eval()
    with torch.no_grad():
        assert torch.allclose(batch_rewards(rm, packed), batch_rewards(rm, padded), rtol=TOLERANCE, atol=1e-5)


def test_packing_spec_rules():
    from pydantic import ValidationError

    from schemas.steps.dpo import DpoSpec
    from schemas.steps.finetune import FinetuneSpec

    spec = FinetuneSpec.model_validate({"kind": "finetune", "model": "base", "data": {"builtin": "tasks"},
                                        "packing": True})
    assert spec.packing_spec().strategy == "padding_free"
    with pytest.raises(ValidationError, match="prompt_tuning"):
        FinetuneSpec.model_validate({"kind": "finetune", "model": "base", "data": {"builtin": "tasks"},
                                     "packing": True, "peft": {"method": "prompt_tuning"}})
    with pytest.raises(ValidationError, match="this kind packs each batch"):
        DpoSpec.model_validate({"kind": "dpo", "model": "base", "data": {"builtin": "preferences"},
                                "packing": {"strategy": "bfd"}})


def test_a_packed_finetune_learns_and_refuses_a_recurrent_model(tmp_path, tiny_lm):
    from components import finetune
    from schemas.steps.finetune import FinetuneSpec
    from tests.conftest import make_ctx

    def spec(**extra):
        return FinetuneSpec.model_validate({
            "kind": "finetune", "model": str(tiny_lm), "peft": {"method": "full"}, "max_steps": 12, "batch_size": 4,
            "data": {"builtin": "tasks", "tasks": ["copy"], "n_per_task": 64, "eval_per_task": 8},
            "optimizer": {"lr": 3e-3}, "evaluation": None, "val_every": 12, **extra})

    out = finetune.run(spec(packing={"strategy": "bfd", "length": 128}), make_ctx(tmp_path / "a", kind="finetune"))
    assert out.metrics["val/loss"] < 6.0 < 6.3  # ln(512) = 6.24 untrained: it learned from the packed rows
    assert 0 < out.metrics["data/padding_share"] < 1
    assert out.metrics["perf/tokens_per_s"] > 0
    from components.lib.sequence_models import FAMILIES, build_config

    rnn = FAMILIES["rnn"][1](build_config("rnn", vocab_size=64))
    with pytest.raises(ValueError, match="carries state from one example to the next"):
        packing.check_packable(rnn)


def _episodes(tok, rng: random.Random):
    """A rollout batch as grpo's sampler leaves it: left-padded prompts of different lengths, responses cut after
    an EOS at different places (one runs to the window's end)."""
    from components.lib.rollout import encode_prompts, first_eos_mask

    rows = [{"prompt": "Copy: " + " ".join(["cat dog"] * rng.randint(1, 6)) + "\nAnswer:"} for _ in range(8)]
    query, query_mask = encode_prompts(tok, rows, 64)
    responses = torch.randint(5, len(tok), (8, 12), generator=torch.Generator().manual_seed(0))
    for i, end in enumerate([2, 11, 5, 0, 7, 3, 9]):  # the 8th has no EOS
        responses[i, end] = tok.eos_token_id
    valid, _, _ = first_eos_mask(responses, tok.eos_token_id)
    responses = torch.where(valid, responses, torch.full_like(responses, tok.pad_token_id))
    return torch.cat([query, responses], 1), torch.cat([query_mask, valid.long()], 1), query.shape[1], responses


@pytest.mark.parametrize("capacity", [None, 24])
def test_grpo_episodes_packed_give_the_log_probs_and_gradients_of_padded_ones(tiny_lm, capacity):
    """The policy's per-token log-probs and entropies of each completion, and the gradient of a loss on them,
    are those of the padded batch, with every packed row no longer than the padded one (24: several rows)."""
    from transformers import AutoTokenizer

    from components.lib.rollout import response_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    ids, mask, context, responses = _episodes(tok, random.Random(0))
    assert (mask == 0).float().mean() > 0.2  # a fifth of the padded batch is padding
    for model in _models(len(tok)):
        model.eval()
        results = []
        for packed in (None, capacity or ids.shape[1]):
            model.zero_grad()
            logp, ent, _ = response_logprobs(model, ids, mask, context, responses, 0.7, entropy=True, packed=packed)
            (logp * mask[:, context:]).sum().backward()
            results.append((logp.detach(), ent.detach(),
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (lp_pad, ent_pad, g_pad), (lp_pack, ent_pack, g_pack) = results
        valid = mask[:, context:].bool()
        assert torch.allclose(lp_pack, lp_pad, rtol=TOLERANCE, atol=1e-5)  # 1.0 past each end on both sides
        assert torch.allclose(ent_pack[valid], ent_pad[valid], rtol=TOLERANCE, atol=1e-5)
        for name, grad in g_pad.items():
            assert torch.allclose(g_pack[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_packed_grpo_step_trains_the_policy_the_padded_one_does(tiny_lm, tmp_path):
    """One iteration, same seed: the same completions are sampled, so the packed update lands on the padded
    one's parameters; bfd (a whole-training-set placement) is refused."""
    from pydantic import ValidationError
    from transformers import AutoModelForCausalLM

    from components import grpo
    from schemas.steps.grpo import GrpoSpec
    from tests.conftest import finish, make_ctx

    base = dict(kind="grpo", policy=str(tiny_lm), rewards=[{"function": "length_penalty"}], iterations=1,
                prompts_per_iteration=4, group_size=4, max_new_tokens=8, eval_samples=0, optimizer={"lr": 1e-3},
                prompts={"builtin": "tasks", "n_per_task": 4, "tasks": ["copy", "count"]})
    states = []
    for packing_setting in (False, True):
        ctx = make_ctx(tmp_path / str(packing_setting), name="grpo", kind="grpo")
        out = grpo.run(GrpoSpec(**base, packing=packing_setting), ctx)
        states.append(AutoModelForCausalLM.from_pretrained(finish(ctx, out).path("model")).state_dict())
    start = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    assert any(not torch.equal(states[1][k], start[k]) for k in start)  # it trained
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, atol=1e-5), name
    with pytest.raises(ValidationError, match="this kind packs each batch"):
        GrpoSpec(**base, packing={"strategy": "bfd"})
