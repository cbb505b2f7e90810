"""The ppo step end to end on a tiny model: honest first ratio, KL 0 at the start, LoRA reference, outputs load."""

from __future__ import annotations

import json

import pytest
import torch

from components import ppo
from components.lib.rewards import load_reward_model
from components.reward_model import save_reward_model
from schemas.steps.ppo import PPOSpec
from tests.conftest import check_contract, finish, make_ctx

TINY = dict(iterations=2, rollouts=8, epochs=2, minibatches=2, max_new_tokens=6, eval_samples=4)


def test_full_policy_with_verifiable_reward(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = PPOSpec(kind="ppo", policy=str(tiny_lm), reward={"function": "length_penalty"},
                   prompts={"builtin": "tasks", "n_per_task": 2, "tasks": ["copy", "count"]},
                   optimizer={"lr": 1e-3}, **TINY)
    ctx = make_ctx(tmp_path, name="ppo", kind="ppo")
    out = ppo.run(spec, ctx)
    first = out.info  # the module's diagnostics are in the metrics; the first minibatch is checked below
    m = out.metrics
    assert m["before/val/kl"] == 0  # the policy is its own reference before any update
    assert {"reward/mean", "ppo/kl", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/explained_variance",
            "ppo/response_length", "reward/true_reward", "val/true_reward"} <= set(m)
    assert first["iterations"] == 2
    before = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(finish(ctx, out).path("model")).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_first_minibatch_has_ratio_one(tiny_lm):
    from components.ppo import build_module, load_policy, load_scorer

    spec = PPOSpec(kind="ppo", policy=str(tiny_lm), reward={"function": "length_penalty"},
                   prompts={"builtin": "tasks", "n_per_task": 2}, **TINY)
    policy, tok = load_policy(str(tiny_lm))
    rows = [{"prompt": f"Copy: cat dog {i}\nAnswer:"} for i in range(8)]

    class Ctx:  # build_module only reads the seed
        seed = 0

    scorer, rm = load_scorer(spec, Ctx(), tok, rows)
    module = build_module(spec, Ctx(), policy, tok, scorer, rm)
    roll, extras = module.rollout(rows)
    assert torch.equal(extras["kl"], torch.zeros_like(extras["kl"]))  # π = π_ref
    module.advantages(roll, extras["kl"])
    loss, stats = module._losses(roll)
    assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6)  # check 6
    assert float(stats["clipfrac"]) == 0 and float(stats["approx_kl"]) == pytest.approx(0.0, abs=1e-10)


def test_lora_policy_with_reward_model_critic_and_jsonl_prompts(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rm, tok = load_reward_model(str(tiny_lm))
    save_reward_model(rm, tok, tmp_path / "rm", {"reward/reference_mean": 0.25, "reward/std": 1.0})
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Copy: cat dog\nAnswer:", "answer": "cat dog"},
        {"messages": [{"role": "user", "content": "Count: sun moon"}], "answer": "2"},
        {"prompt": "Larger: 12 or 40\nAnswer:", "answer": "40"}, {"prompt": "Reverse: a b\nAnswer:", "answer": "b a"}]))
    spec = PPOSpec(kind="ppo", policy=str(tiny_lm), reward_model=str(tmp_path / "rm"),
                   prompts={"files": ["prompts.jsonl"], "eval_fraction": 0.25}, peft={"method": "lora", "r": 4},
                   kl={"estimator": "k3", "target": 1.0}, optimizer={"lr": 1e-3}, true_reward="exact_match", **TINY)
    ctx = make_ctx(tmp_path, name="ppo", kind="ppo")
    out = ppo.run(spec, ctx)
    check_contract(spec, out)
    assert out.metrics["before/val/kl"] == 0  # LoRA starts at B = 0: adapters disabled = enabled
    assert "reward/model_score" in out.metrics and "val/true_reward" in out.metrics  # exact_match measured
    assert out.metrics["ppo/beta"] != 0.05  # the adaptive controller moved β
    res = finish(ctx, out)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    PeftModel.from_pretrained(base, res.path("adapter"))
    AutoModelForCausalLM.from_pretrained(res.path("model"))


def test_reward_model_scores_are_centred_and_scaled_by_the_saved_std(tiny_lm, tmp_path):
    from components.ppo import load_scorer
    from components.ppo.rollout import left_pad, sample

    rm, tok = load_reward_model(str(tiny_lm))
    save_reward_model(rm, tok, tmp_path / "rm", {"reward/reference_mean": 0.5, "reward/std": 4.0})
    rows = [{"prompt": "Copy: cat dog\nAnswer:", "answer": "cat dog"}]
    query, mask = left_pad([tok(rows[0]["prompt"])["input_ids"]], tok.pad_token_id)
    from transformers import AutoModelForCausalLM

    roll = sample(AutoModelForCausalLM.from_pretrained(tiny_lm), query, mask, 4, 1.0, tok.eos_token_id,
                  tok.pad_token_id, greedy=True)
    scores = {}
    for normalize in (False, True):
        spec = PPOSpec(kind="ppo", policy=str(tiny_lm), reward_model=str(tmp_path / "rm"), normalize_reward=normalize,
                       prompts={"files": ["p.jsonl"]})
        scorer, _ = load_scorer(spec, make_ctx(tmp_path, name="ppo"), tok, rows)
        scores[normalize] = float(scorer(roll, rows)[1]["model_score"])
    assert scores[True] == pytest.approx(scores[False] / 4.0, rel=1e-5)  # (r - mean) / std


def test_schema_errors():
    with pytest.raises(ValueError, match="give reward_model, reward"):
        PPOSpec(kind="ppo", policy="sft", prompts={"builtin": "tasks"})
    with pytest.raises(ValueError, match="critic: reward_model needs a reward_model"):
        PPOSpec(kind="ppo", policy="sft", prompts={"builtin": "tasks"}, reward={"function": "exact_match"},
                critic="reward_model")
    with pytest.raises(KeyError, match="did you mean 'exact_match'"):
        from components.lib.rewards import get_reward

        get_reward("exact_mach")
