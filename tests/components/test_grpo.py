"""The grpo step end to end on a tiny model: rewards per source, honest first ratio, LoRA reference, outputs load."""

from __future__ import annotations

import textwrap

import pytest
import torch

from components import grpo
from components.lib.rewards import load_reward_model
from components.reward_model import save_reward_model
from schemas.steps.grpo import GrpoSpec
from tests.conftest import check_contract, finish, make_ctx

TINY = dict(iterations=3, prompts_per_iteration=4, group_size=4, max_new_tokens=6, eval_samples=4,
            prompts={"builtin": "tasks", "n_per_task": 4, "tasks": ["copy", "count"]})
USER_REWARDS = '''
def short_words(prompt, completion, row):
    """Reward completions of few words; leave empty ones unscored."""
    return None if not completion.strip() else -len(completion.split()) / 5
'''


def test_full_policy_with_verifiable_and_user_rewards(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    spec = GrpoSpec(kind="grpo", policy=str(tiny_lm), rewards=[{"function": "length_penalty"},
                                                                {"function": "my_rewards:short_words", "weight": 0.5}],
                    loss_type="grpo", epochs=2, minibatches=2, kl={"coef": 0.05}, dynamic_sampling=True,
                    overlong={"soft_punishment": {"cache": 2}}, optimizer={"lr": 1e-3}, **TINY)
    assert spec.input_globs() == ["my_rewards.py"]  # editing the user's file re-runs the step
    ctx = make_ctx(tmp_path, name="grpo", kind="grpo")
    out = grpo.run(spec, ctx)
    check_contract(spec, out)
    m = out.metrics
    assert m["before/val/kl"] == 0  # the policy is its own reference before any update
    assert {"reward/length_penalty", "reward/short_words", "reward/overlong", "val/true_reward"} <= set(m)
    assert m["reward/overlong"] <= 0 and m["reward/length_penalty"] <= 0
    assert 0 <= m["grpo/zero_std_fraction"] <= 1 and m["grpo/completion_length"] > 0
    assert out.info["iterations"] == 3 and 0 < m["train/steps"] <= 3 * 2 * 2
    before = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(finish(ctx, out).path("model")).state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k]) and "embed_tokens" not in k]
    assert not unchanged, unchanged  # embeddings change only in the rows of the tokens sampled
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_dynamic_sampling_drops_groups_that_all_agree(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "flat.py").write_text("def one(prompt, completion, row):\n    return 1.0\n")
    spec = GrpoSpec(kind="grpo", policy=str(tiny_lm), rewards=[{"function": "flat:one"}], dynamic_sampling=True,
                    optimizer={"lr": 1e-2}, **{**TINY, "iterations": 2})
    ctx = make_ctx(tmp_path, name="grpo", kind="grpo")
    out = grpo.run(spec, ctx)
    check_contract(spec, out)
    m = out.metrics
    assert m["grpo/zero_std_fraction"] == 1 and m["grpo/skipped_groups"] == 2 * 4  # every group, both iterations
    assert m["train/steps"] == 0 and out.info["iterations"] == 2  # the loop still ends after `iterations`
    before = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(finish(ctx, out).path("model")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_first_pass_has_ratio_one_and_no_clipping(tiny_lm):
    from components.grpo import build_module, build_rewards, load_functions
    from components.lib.policy import load_policy

    spec = GrpoSpec(kind="grpo", policy=str(tiny_lm), rewards=[{"function": "length_penalty"}], **TINY)
    policy, tok = load_policy(str(tiny_lm))
    rows = [{"prompt": f"Copy: cat dog {i}\nAnswer:"} for i in range(4) for _ in range(4)]

    class Ctx:  # build_module and the rewards read only these
        seed, base_dir, upstream = 0, ".", {}

    module = build_module(spec, Ctx(), policy, tok, build_rewards(spec, Ctx(), tok, *load_functions(spec, Ctx())))
    roll, extras = module.rollout(rows)
    assert torch.equal(extras["kl"], torch.zeros_like(extras["kl"]))  # π = π_ref
    roll.advantages, _, _ = grpo.core.group_advantages(roll.scores, 4, "grpo")
    for loss_type in ("grpo", "dapo", "gspo"):
        module.hparams.loss_type = loss_type
        _, stats = module._loss(roll, float(roll.loss_mask.sum()))
        assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6)
        assert float(stats["clip_fraction"]) == 0 and float(stats["approx_kl"]) == pytest.approx(0.0, abs=1e-10)


def test_lora_policy_with_a_reward_model_source(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rm, tok = load_reward_model(str(tiny_lm))
    save_reward_model(rm, tok, tmp_path / "rm", {"reward/reference_mean": 0.25, "reward/std": 2.0})
    spec = GrpoSpec(kind="grpo", policy=str(tiny_lm), rewards=[{"reward_model": str(tmp_path / "rm")},
                                                                {"function": "length_penalty", "weight": 0.1}],
                    true_reward="exact_match", peft={"method": "lora", "r": 4}, loss_type="gspo", advantage="rloo",
                    kl={"coef": 0.1, "estimator": "k1"}, overlong={"filter": True}, optimizer={"lr": 1e-3}, **TINY)
    ctx = make_ctx(tmp_path, name="grpo", kind="grpo")
    out = grpo.run(spec, ctx)
    check_contract(spec, out)
    assert out.metrics["before/val/kl"] == 0  # LoRA starts at B = 0: adapters disabled = enabled
    assert {"reward/model_score", "val/model_score", "val/true_reward"} <= set(out.metrics)
    res = finish(ctx, out)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), res.path("adapter"))
    AutoModelForCausalLM.from_pretrained(res.path("model"))


def test_user_reward_errors_name_the_file_and_function(tmp_path):
    from components.grpo.module import score
    from components.lib.rewards import load_reward

    (tmp_path / "mine.py").write_text("def brevity(prompt, completion, row):\n    return 'short'\n")
    with pytest.raises(ValueError, match=r"has no function 'brevty' \(did you mean 'brevity'"):
        load_reward("mine:brevty", tmp_path, "rewards[0].function")
    with pytest.raises(ValueError, match="rewards\\[0\\].function: no file .*nothere.py beside the spec"):
        load_reward("nothere:f", tmp_path, "rewards[0].function")
    with pytest.raises(TypeError, match="brevity returned 'short' \\(str\\)"):
        score(load_reward("mine:brevity", tmp_path), "brevity", [{"prompt": "p"}], ["c"])


def test_schema_errors():
    base = dict(kind="grpo", policy="sft", prompts={"builtin": "tasks"})
    with pytest.raises(ValueError, match="exactly one of function or reward_model"):
        GrpoSpec(**base, rewards=[{"function": "exact_match", "reward_model": "rm"}])
    with pytest.raises(ValueError, match="unique and none of .* got exact_match"):
        GrpoSpec(**base, rewards=[{"function": "exact_match"}, {"function": "exact_match", "weight": 2}])
    with pytest.raises(ValueError, match="got overlong"):
        GrpoSpec(**base, rewards=[{"function": "mine:overlong"}])
    with pytest.raises(ValueError, match="at most one reward_model"):
        GrpoSpec(**base, rewards=[{"reward_model": "rm"}, {"reward_model": "rm2", "name": "other"}])
    with pytest.raises(ValueError, match=r"cache \(20\) must be at most max_len \(16\)"):
        GrpoSpec(**base, rewards=[{"function": "exact_match"}], overlong={"soft_punishment": {"cache": 20}})
    with pytest.raises(ValueError, match="grpo supports full or lora, got 'ia3'"):
        GrpoSpec(**base, rewards=[{"function": "exact_match"}], peft={"method": "ia3"})
    spec = GrpoSpec(**base, rewards=[{"function": "mine:Brevity"}, {"reward_model": "rm"}])
    assert spec.reward_names() == ["brevity", "model_score"] and spec.true_reward_function() == "mine:Brevity"
