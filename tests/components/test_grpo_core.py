"""The GRPO arithmetic against TRL's GRPOTrainer on the same batches, and the checks of ALGORITHMS.md §8."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from components.grpo import core

LN_HALF = math.log(0.5)


def trl_loss(logp, old_logp, advantages, mask, loss_type, clip_low=0.2, clip_high=0.2, level="token", beta=0.0,
             ref_logp=None, num_items=None, max_len=None):
    """TRL 1.16's `GRPOTrainer._compute_loss` on a stub trainer (ALGORITHMS.md §8): one process, no accumulation."""
    from trl import GRPOTrainer

    batch, width = logp.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        loss_type=loss_type, epsilon_low=clip_low, epsilon_high=clip_high, importance_sampling_level=level,
        beta=beta, top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len or width, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                    gather_for_metrics=lambda x: x),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask.float(),
              "advantages": advantages, "old_per_token_logps": old_logp,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


# TRL's name for each of ours: gspo is the sequence-level ratio with grpo's aggregation
TRL_NAMES = {"grpo": ("grpo", "token"), "dr_grpo": ("dr_grpo", "token"), "dapo": ("dapo", "token"),
             "gspo": ("grpo", "sequence")}


@pytest.fixture
def batch():
    """Two groups of four completions of different lengths, off-policy by a little, with a reference."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 5, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    old = -torch.rand(8, 5, generator=gen) * 3
    logp = old + 0.3 * torch.randn(8, 5, generator=gen)
    ref = old + 0.2 * torch.randn(8, 5, generator=gen)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.0, 0.4])
    return logp, old, ref, mask, rewards


@pytest.mark.parametrize("loss_type", core.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_agree_with_trl(batch, loss_type, beta):
    logp, old, ref, mask, rewards = batch
    adv, _, _ = core.group_advantages(rewards, 4, "grpo")
    name, level = TRL_NAMES[loss_type]
    ours_in, trl_in = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, stats = core.grpo_loss(ours_in, old, adv, mask, loss_type, 0.2, 0.28, ref_logp=ref, beta=beta,
                                 estimator="k3", max_completion_length=6)
    theirs, logged = trl_loss(trl_in, old, adv, mask, name, 0.2, 0.28, level, beta, ref, max_len=6)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_in.grad * mask, trl_in.grad * mask, atol=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-6)
    assert float(stats["clip_low_fraction"]) == pytest.approx(logged["clip_ratio/low_mean"][0], abs=1e-6)
    assert float(stats["clip_high_fraction"]) == pytest.approx(logged["clip_ratio/high_mean"][0], abs=1e-6)
    if beta:
        assert float(stats["kl"]) == pytest.approx(logged["kl"][0], abs=1e-6)


def test_dapo_normalises_by_the_token_count_it_is_given(batch):
    logp, old, _, mask, rewards = batch
    adv, _, _ = core.group_advantages(rewards, 4, "dr_grpo")
    ours, _ = core.grpo_loss(logp, old, adv, mask, "dapo", num_items=40)
    theirs, _ = trl_loss(logp, old, adv, mask, "dapo", num_items=40)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)


REWARDS = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0])


def test_advantages_match_trls_values():  # §8 check 1 (group and none scaling) and check 2 (RLOO)
    grpo, zero, _ = core.group_advantages(REWARDS, 4, "grpo")
    assert torch.allclose(grpo, torch.tensor([0.865875, -0.865875, -0.865875, 0.865875, 0.4999, 0.4999, 0.4999,
                                              -1.4997]), atol=1e-4)
    assert not zero.any()
    dr, _, _ = core.group_advantages(REWARDS, 4, "dr_grpo")
    assert torch.allclose(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    rloo, _, _ = core.group_advantages(REWARDS, 4, "rloo")
    assert torch.allclose(rloo, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]), atol=1e-6)
    for method in core.ADVANTAGES:
        same, zero, _ = core.group_advantages(torch.ones(4), 4, method)
        assert torch.equal(same, torch.zeros(4)) and zero.all()


def test_advantages_follow_trls_formula_with_unscored_completions():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.5, 0.3, 0.2, 0.9, 0.1])
    grouped = rewards.view(-1, 4)
    expected = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, dim=1)[:, None] + 1e-4)
    ours, _, std = core.group_advantages(rewards, 4, "grpo")
    assert torch.allclose(ours, torch.nan_to_num(expected.reshape(-1)), atol=1e-6)
    assert torch.allclose(std, nanstd(grouped, dim=1))
    assert ours[1] == 0  # an unscored completion carries no signal
    weights = torch.tensor([1.0, 0.5])
    per_source = torch.tensor([[1.0, 2.0], [float("nan"), 4.0], [float("nan"), float("nan")]])
    assert torch.allclose(core.combine_rewards(per_source, weights)[:2], torch.tensor([2.0, 2.0]))
    assert torch.isnan(core.combine_rewards(per_source, weights)[2])


@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
def test_advantages_sum_to_zero_in_each_group(method):
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(1))
    adv, _, _ = core.group_advantages(rewards, 6, method)
    assert torch.allclose(adv.view(-1, 6).sum(1), torch.zeros(4), atol=1e-5)


def hand_batch(ratios=None):
    """§8 check 3: B=2, T=3, m=[[1,1,0],[1,1,1]], A=[1, -0.5], logπ = ln 0.5; `ratios` sets logπ_old."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    logp = torch.full((2, 3), LN_HALF, requires_grad=True)
    r = torch.ones(2, 3) if ratios is None else torch.tensor(ratios)
    old = (LN_HALF - torch.log(r)).detach()
    return logp, old, torch.tensor([1.0, -0.5]), mask


CHECK3 = {"grpo": -0.25, "dr_grpo": -0.0625, "dapo": -0.1, "gspo": -0.25}


@pytest.mark.parametrize("loss_type", CHECK3)
def test_on_policy_losses_match_the_hand_values(loss_type):  # §8 check 3 (N = 5, max_completion_length = 4)
    logp, old, adv, mask = hand_batch()
    loss, stats = core.grpo_loss(logp, old, adv, mask, loss_type, max_completion_length=4)
    assert float(loss) == pytest.approx(CHECK3[loss_type], abs=1e-6)
    assert float(stats["ratio"]) == 1 and float(stats["clip_fraction"]) == 0


def test_on_policy_gradients_are_the_plain_policy_gradient():  # §8 check 4
    for loss_type, expected in (("grpo", [[-0.25, -0.25, 0], [1 / 12] * 3]), ("dapo", [[-0.2, -0.2, 0], [0.1] * 3])):
        logp, old, adv, mask = hand_batch()
        loss, _ = core.grpo_loss(logp, old, adv, mask, loss_type)
        loss.backward()
        assert torch.allclose(logp.grad, torch.tensor(expected), atol=1e-6), loss_type


RATIOS = [[1.5, 0.7, 1.0], [1.1, 0.6, 1.3]]


@pytest.mark.parametrize("loss_type,high,expected", [
    ("grpo", 0.2, -0.208333), ("dapo", 0.2, -0.06), ("dr_grpo", 0.2, -0.0375),
    ("grpo", 0.28, -0.228333), ("dapo", 0.28, -0.076), ("gspo", 0.2, -0.274790)])
def test_clipped_losses_match_the_hand_values(loss_type, high, expected):  # §8 check 5
    logp, old, adv, mask = hand_batch(RATIOS)
    loss, _ = core.grpo_loss(logp, old, adv, mask, loss_type, clip_high=high, max_completion_length=4)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    if loss_type == "gspo":
        log_s = core.importance_log_weights(logp, old, mask, "sequence")
        assert torch.allclose(log_s.exp().squeeze(1), torch.tensor([1.024695, 0.950223]), atol=1e-6)


def test_a_large_ratio_is_clipped():  # §8 check 6 without delta
    logp, old, adv, mask = hand_batch([[1, 1, 1], [3, 1, 1]])
    loss, stats = core.grpo_loss(logp, old, adv, mask, "grpo")
    assert float(loss) == pytest.approx(-0.083333, abs=1e-6)


def test_k3_term_in_the_loss():  # §8 check 7 (TRL's bnpo is dapo over this batch's tokens)
    logp, old, adv, mask = hand_batch()
    ref = torch.tensor([[math.log(0.25), 0.0, 0.0], [LN_HALF] * 3])
    loss, stats = core.grpo_loss(logp, old, adv, mask, "dapo", ref_logp=ref, beta=0.1, estimator="k3")
    assert float((core.kl_per_token(logp, ref, "k3") * mask).sum()) == pytest.approx(0.5, abs=1e-6)
    assert float(stats["kl"]) == pytest.approx(0.1, abs=1e-6)
    assert float(loss) == pytest.approx(-0.09, abs=1e-6)


def test_soft_overlong_punishment_matches_trl():  # §8 check 8
    from trl.rewards import get_soft_overlong_punishment

    lengths = torch.tensor([80, 81, 90, 100, 101])
    ours = core.soft_overlong_punishment(lengths, 100, 20)
    assert torch.allclose(ours, torch.tensor([0, -0.05, -0.5, -1, -1]))
    theirs = get_soft_overlong_punishment(100, 20)([[1] * int(n) for n in lengths])
    assert torch.allclose(ours, torch.tensor(theirs))


@pytest.mark.parametrize("loss_type", core.LOSS_TYPES)
def test_a_group_with_equal_rewards_gives_no_policy_gradient(batch, loss_type):
    logp, old, _, mask, _ = batch
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.0, 1.0])
    adv, zero, _ = core.group_advantages(rewards, 4, "grpo")
    assert zero.tolist() == [True, False]
    logp = logp.clone().requires_grad_()
    loss, _ = core.grpo_loss(logp, old, adv, mask, loss_type)
    loss.backward()
    assert torch.equal(logp.grad[:4], torch.zeros_like(logp.grad[:4]))
    assert logp.grad[4:].abs().sum() > 0


@pytest.mark.parametrize("loss_type", core.LOSS_TYPES)
def test_one_pass_has_ratio_one_and_clipping_changes_nothing(batch, loss_type):
    logp, _, _, mask, rewards = batch
    adv, _, _ = core.group_advantages(rewards, 4, "grpo")
    old = logp.detach().clone()  # old log-probs from the same forward pass
    results = []
    for low, high in ((0.2, 0.2), (0.999, 1e9)):  # clipped, and clipped so wide it never binds
        x = logp.clone().requires_grad_()
        loss, stats = core.grpo_loss(x, old, adv, mask, loss_type, low, high)
        loss.backward()
        results.append((float(loss), x.grad))
        assert float(stats["ratio"]) == 1 and float(stats["clip_fraction"]) == 0
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-7)
    assert torch.allclose(results[0][1], results[1][1])


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        core.grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1).bool(), "bnpo")
    with pytest.raises(ValueError, match="advantage must be one of"):
        core.group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        core.group_advantages(torch.zeros(6), 4)
