"""The PPO arithmetic against the checks of ALGORITHMS.md §1 (pure tensors, no models)."""

from __future__ import annotations

import math

import pytest
import torch

from components.ppo import core


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logp = -torch.rand(4, 6) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    return logp, mask


def test_kl_vanishes_when_policy_is_reference(batch):
    logp, mask = batch
    for est in ("k1", "k3"):
        kl = core.kl_per_token(logp, logp.clone(), est)
        assert torch.equal(kl, torch.zeros_like(kl))
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    _, seq_end, _ = core.first_eos_mask(torch.where(mask, 5, 2), eos_id=2)
    rewards = core.token_rewards(scores, core.kl_per_token(logp, logp, "k1"), 0.05, mask, mask.sum(1) - 1)
    assert torch.allclose(rewards.sum(1), scores)  # check 1: Σ_t r_t = score


def test_k3_is_nonnegative_and_rewards_sum(batch):
    logp, mask = batch
    ref = logp + torch.randn_like(logp) * 2
    assert (core.kl_per_token(logp, ref, "k3") >= 0).all()
    kl = core.kl_per_token(logp, ref, "k1")
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    rewards = core.token_rewards(scores, kl, 0.1, mask, mask.sum(1) - 1)
    assert torch.allclose(rewards.sum(1), scores - 0.1 * (kl * mask).sum(1), atol=1e-6)  # check 3
    with pytest.raises(ValueError, match="k1' or 'k3"):
        core.kl_per_token(logp, ref, "k2")


def test_gae_special_cases(batch):
    _, mask = batch
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 6) * mask, torch.randn(4, 6) * mask
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv * mask, (to_go - values) * mask, atol=1e-5)  # check 4: reward-to-go − V
    assert torch.allclose(ret * mask, to_go * mask, atol=1e-5)
    adv0, _ = core.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(4, 1)], 1)
    assert torch.allclose(adv0 * mask, (rewards + 0.9 * next_v - values) * mask, atol=1e-6)  # A_t = δ_t


def test_whitening_mean0_var1_zero_on_pads(batch):
    _, mask = batch
    x = torch.randn(4, 6) * 5 + 3
    w = core.masked_whiten(x, mask)
    assert abs(float(core.masked_mean(w, mask))) < 1e-5
    assert abs(float(core.masked_var(w, mask)) - 1) < 1e-4
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))


def test_policy_loss_ratio_one_and_zero_gradient_when_clipped(batch):
    logp, mask = batch
    adv = torch.randn(4, 6)
    loss, stats = core.policy_loss(logp, logp.clone(), adv, mask)
    assert float(stats["ratio"]) == pytest.approx(1.0) and float(stats["clipfrac"]) == 0
    assert float(stats["approx_kl"]) == 0
    assert float(loss) == pytest.approx(float(core.masked_mean(-adv, mask)), abs=1e-6)
    # check 7: A > 0 and ρ > 1 + ε -> the clipped branch wins and carries no gradient
    new = (logp + 0.5).requires_grad_(True)
    loss, stats = core.policy_loss(new, logp, torch.ones_like(logp), mask, clip=0.2)
    loss.backward()
    assert torch.equal(new.grad, torch.zeros_like(new.grad)) and float(stats["clipfrac"]) == 1.0


def test_value_loss_unclipped_inside_band(batch):
    _, mask = batch
    old, ret = torch.randn(4, 6), torch.randn(4, 6)
    new = old + 0.1 * torch.tanh(torch.randn(4, 6))
    loss, stats = core.value_loss(new, old, ret, mask, clip=0.2)
    assert float(loss) == pytest.approx(0.5 * float(core.masked_mean((new - ret) ** 2, mask)), rel=1e-6)
    assert float(stats["clipfrac"]) == 0


def test_missing_eos_penalty_touches_only_rows_without_eos():
    responses = torch.tensor([[5, 6, 2, 7], [5, 6, 7, 8], [2, 9, 9, 9], [5, 5, 5, 5]])
    valid, seq_end, has_eos = core.first_eos_mask(responses, eos_id=2)
    assert has_eos.tolist() == [True, False, True, False]
    assert seq_end.tolist() == [2, 3, 0, 3]
    assert valid[0].tolist() == [True, True, True, False]
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert core.penalize_missing_eos(scores, has_eos, 1.0).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert core.truncate_after_eos(responses, 2, 0)[2].tolist() == [2, 0, 0, 0]


def test_adaptive_kl_controller():
    ctl = core.AdaptiveKL(0.1, target=6.0, horizon=100)
    assert ctl.update(6.0, 32) == pytest.approx(0.1)  # check 10: unchanged at target
    assert ctl.update(100.0, 10) == pytest.approx(0.1 * 1.02)  # error clipped to +0.2
    assert core.AdaptiveKL(0.05).update(100.0, 10) == 0.05  # fixed without a target


def test_explained_variance(batch):
    _, mask = batch
    ret = torch.randn(4, 6)
    assert float(core.explained_variance(ret, ret, mask)) == pytest.approx(1.0)  # check 11
    assert float(core.explained_variance(torch.zeros(4, 6) + float(core.masked_mean(ret, mask)), ret, mask)) \
        == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(float(core.explained_variance(ret, torch.zeros(4, 6), mask)))
