"""The `ppo` step: optimize a policy with PPO against a reward model and/or verifiable rewards.

Reads the policy (usually the SFT model), a reward model step or folder, and prompts; writes the
final policy as `model/` (and `adapter/` with LoRA), logs per-iteration curves, a held-out comparison
of the initial and final policy (reward-model score and true reward, so reward hacking shows) and
sample completions. Algorithm: Schulman et al. 2017 (PPO), Ziegler et al. 2019 and Ouyang et al. 2022
(KL-penalized RLHF), Huang et al. 2024 (implementation details); see ALGORITHMS.md §1.
"""

from __future__ import annotations

import copy
import time

import lightning as L
import torch

from components.lib.context import StepContext, StepOutput, effort
from components.lib.decoding import step_decoder
from components.lib.policy import held_out, load_policy
from components.lib.training import fit, make_trainer, world_size
from schemas.base import TrainingLoop
from schemas.steps.ppo import PPOSpec


def load_prompts(spec: PPOSpec, ctx: StepContext, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt rows; builtin rows carry the task's answer for verifiable rewards."""
    from components.lib.policy import load_prompts as load_prompt_rows

    return load_prompt_rows(spec.prompts, spec.rollouts * world_size(), ctx, tokenizer)


def load_scorer(spec: PPOSpec, ctx: StepContext, tokenizer, rows: list[dict]):
    """(Scorer, reward model or None): reward model (frozen, centred) and verifiable reward functions."""
    from components.lib.rewards import get_reward, load_frozen_reward_model, reward_model_source
    from components.ppo.module import Scorer

    rm, mean, scale = None, 0.0, 1.0
    if spec.reward_model is not None:
        stats = ctx.step(spec.reward_model).info if spec.reward_model in ctx.upstream else {}
        rm, mean, scale = load_frozen_reward_model(reward_model_source(spec.reward_model, ctx), tokenizer, stats,
                                                   spec.normalize_reward)
    fn = get_reward(spec.reward.function, spec.reward.module) if spec.reward else None
    true_name = spec.true_reward_function()
    true_fn = get_reward(true_name, spec.reward.module if spec.reward else None) if true_name else None
    weight = spec.reward.weight if spec.reward else 1.0
    return Scorer(rm, mean, fn, weight, true_fn, tokenizer, reward_scale=scale), rm


def build_module(spec: PPOSpec, ctx: StepContext, policy, tokenizer, scorer, rm):
    """The Lightning module: LoRA or full policy, frozen reference, critic from the RM or a value head."""
    from components.ppo.module import PPOModule

    decoder = step_decoder(ctx)  # trainer.generation: how rollouts decode
    reference = None
    if spec.peft.method == "lora":
        from components.lib.peft import apply_peft

        policy = apply_peft(policy, spec.peft)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    critic_kind = spec.critic if spec.critic != "auto" else ("reward_model" if rm is not None else "value_head")
    critic = value_head = None
    if critic_kind == "reward_model":
        critic = copy.deepcopy(rm).requires_grad_(True).train()
    else:
        value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    steps = spec.iterations * spec.epochs * spec.minibatches
    return PPOModule(
        policy, tokenizer, scorer, reference=reference, critic=critic, value_head=value_head,
        optimizer=spec.optimizer.model_dump(), schedule=spec.schedule.model_dump(), total_steps=steps,
        grad_clip=spec.grad_clip,
        epochs=spec.epochs, minibatches=spec.minibatches, temperature=spec.temperature,
        max_new_tokens=spec.max_new_tokens, max_prompt_length=spec.prompts.max_length, kl_coef=spec.kl.coef,
        kl_target=spec.kl.target, kl_horizon=spec.kl.horizon, kl_estimator=spec.kl.estimator, gamma=spec.gamma,
        lam=spec.lam, clip=spec.clip, value_clip=spec.value_clip, vf_coef=spec.vf_coef,
        whiten_rewards=spec.whiten_rewards, missing_eos_penalty=spec.missing_eos_penalty,
        generation_cache=decoder.cache, generation_compile=decoder.compile, seed=ctx.seed)


def run(spec: PPOSpec, ctx: StepContext) -> StepOutput:
    """Load policy, reward and prompts; train PPO iterations with Lightning; compare held-out; save and log."""
    from torch.utils.data import DataLoader

    from components.ppo.trainer import IterationProgress, log_results, save_policy

    L.seed_everything(ctx.seed, workers=True, verbose=False)
    policy, tokenizer = load_policy(ctx.model_source(spec.policy))
    train_rows, eval_rows = load_prompts(spec, ctx, tokenizer)
    scorer, rm = load_scorer(spec, ctx, tokenizer, eval_rows)
    module = build_module(spec, ctx, policy, tokenizer, scorer, rm)

    before, initial_texts = held_out(module, eval_rows, ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    loader = DataLoader(train_rows, batch_size=spec.rollouts, shuffle=True, generator=gen, drop_last=True,
                        collate_fn=list)
    per_iteration = spec.epochs * spec.minibatches  # the trainer's step counts optimizer steps
    loop = TrainingLoop(optimizer=spec.optimizer, schedule=spec.schedule, grad_clip=spec.grad_clip,
                        checkpoint_every=spec.checkpoint_every * per_iteration)
    trainer = make_trainer(ctx, loop, spec.iterations * per_iteration, validate=False, manual=True,
                           callbacks=[IterationProgress(ctx.name, spec.iterations)])
    start = time.perf_counter()
    fit(trainer, module, ctx=ctx, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    after, final_texts = held_out(module, eval_rows, ctx.seed)
    ctx.log_metrics(after, step=trainer.global_step)

    metrics = {**after, **{f"before/{k}": v for k, v in before.items()}, **module.history[-1],
               "perf/train_seconds": seconds, "train/steps": trainer.global_step}
    outputs = save_policy(module, tokenizer, ctx, spec)
    log_results(ctx, spec, module, eval_rows, initial_texts, final_texts, outputs)
    return StepOutput(outputs=outputs, metrics=metrics,
                      info={"iterations": len(module.history), "true_reward": after.get("val/true_reward"),
                            "effort": effort(examples=len(module.history) * spec.rollouts * world_size(),
                                             of="rollouts")})
