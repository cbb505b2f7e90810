"""The `grpo` step: optimize a policy with group-relative advantages, without a critic.

Reads the policy (usually the SFT model), prompts, and its reward sources: registered verifiable functions, a
reward model step or folder, and `module:function` files beside the spec (which run the user's code). Writes the
final policy as `model/` (and `adapter/` with LoRA), logs per-iteration curves (each reward source on its own),
a held-out comparison of the initial and final policy (true reward, and model score with a reward model, so
reward hacking shows) and sample completions. Algorithms: GRPO (Shao et al. 2024, DeepSeekMath), RLOO
(Ahmadian et al. 2024), DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025), GSPO (Zheng et al. 2025), as TRL's
GRPOTrainer computes them; see components/grpo/core.py and ALGORITHMS.md §8.
"""

from __future__ import annotations

import copy
import time

import lightning as L
import torch

from components.lib.context import StepContext, StepOutput, effort
from components.lib.decoding import step_decoder
from components.lib.packing import check_packable
from components.lib.policy import (IterationProgress, held_out, load_policy, load_prompts, log_policy_results,
                                   save_policy)
from components.lib.training import fit, make_trainer, world_size
from schemas.base import TrainingLoop
from schemas.steps.grpo import GrpoSpec

SHOWN = ("reward/mean", "reward/true_reward", "grpo/kl", "grpo/zero_std_fraction", "grpo/completion_length")


def load_functions(spec: GrpoSpec, ctx: StepContext) -> tuple[dict, object]:
    """({metric name: function} of the function sources, the true-reward function or None), user files imported."""
    from components.lib.rewards import load_reward

    functions = {f"{r.metric_name()}": load_reward(r.function, ctx.base_dir, f"rewards[{i}].function")
                 for i, r in enumerate(spec.rewards) if r.function}
    true_name = spec.true_reward_function()
    return functions, (load_reward(true_name, ctx.base_dir, "true_reward") if true_name else None)


def build_rewards(spec: GrpoSpec, ctx: StepContext, tokenizer, functions: dict, true_fn):
    """The reward sources in spec order; a reward model frozen, centred and scaled as ppo's."""
    from components.grpo.module import Rewards
    from components.lib.rewards import load_frozen_reward_model, reward_model_source

    rm, mean, scale = None, 0.0, 1.0
    source = next((r for r in spec.rewards if r.reward_model is not None), None)
    if source is not None:
        stats = ctx.step(source.reward_model).info if source.reward_model in ctx.upstream else {}
        rm, mean, scale = load_frozen_reward_model(reward_model_source(source.reward_model, ctx), tokenizer, stats)
    soft = spec.overlong.soft_punishment
    overlong = (soft.max_len or spec.max_new_tokens, soft.cache) if soft else None
    weights = [r.weight for r in spec.rewards] + ([1.0] if soft else [])
    return Rewards(spec.reward_names(), weights, functions, tokenizer, rm, mean, scale, overlong, true_fn)


def build_module(spec: GrpoSpec, ctx: StepContext, policy, tokenizer, rewards):
    """The Lightning module: LoRA or full policy, the reference (a frozen copy, or the adapter disabled)."""
    from components.grpo.module import GRPOModule

    decoder = step_decoder(ctx)  # trainer.generation: how rollouts decode
    reference, packing = None, spec.packing_spec()
    if packing is not None:
        check_packable(policy)
    if spec.peft.method == "lora":
        from components.lib.peft import apply_peft

        policy = apply_peft(policy, spec.peft)
    else:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    return GRPOModule(
        policy, tokenizer, rewards, reference=reference, optimizer=spec.optimizer.model_dump(),
        schedule=spec.schedule.model_dump(), total_steps=spec.iterations * spec.epochs * spec.minibatches,
        grad_clip=spec.grad_clip, iterations=spec.iterations, group_size=spec.group_size, advantage=spec.advantage,
        loss_type=spec.loss_type, clip_low=spec.clip.low, clip_high=spec.clip.high, kl_coef=spec.kl.coef,
        kl_estimator=spec.kl.estimator, dynamic_sampling=spec.dynamic_sampling,
        overlong_filter=spec.overlong.filter, epochs=spec.epochs, minibatches=spec.minibatches,
        temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, max_prompt_length=spec.prompts.max_length,
        generation_cache=decoder.cache, generation_compile=decoder.compile,
        packing=packing is not None, packing_length=packing.length if packing else None,
        seed=ctx.seed)


def run(spec: GrpoSpec, ctx: StepContext) -> StepOutput:
    """Load rewards, policy and prompts; train GRPO iterations with Lightning; compare held-out; save and log."""
    from torch.utils.data import DataLoader

    L.seed_everything(ctx.seed, workers=True, verbose=False)
    functions, true_fn = load_functions(spec, ctx)  # the user's files fail here, before any model loads
    policy, tokenizer = load_policy(ctx.model_source(spec.policy))
    train_rows, eval_rows = load_prompts(spec.prompts, spec.prompts_per_iteration * world_size(), ctx, tokenizer)
    rewards = build_rewards(spec, ctx, tokenizer, functions, true_fn)
    module = build_module(spec, ctx, policy, tokenizer, rewards)

    before, initial_texts = held_out(module, eval_rows, ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed)
    loader = DataLoader(train_rows, batch_size=spec.prompts_per_iteration, shuffle=True, generator=gen,
                        drop_last=True, collate_fn=list)
    per_iteration = spec.epochs * spec.minibatches  # the trainer's step counts optimizer steps
    loop = TrainingLoop(optimizer=spec.optimizer, schedule=spec.schedule, grad_clip=spec.grad_clip,
                        checkpoint_every=spec.checkpoint_every * per_iteration)
    trainer = make_trainer(ctx, loop, spec.iterations * per_iteration, validate=False, manual=True,
                           callbacks=[IterationProgress(ctx.name, spec.iterations, SHOWN)])
    start = time.perf_counter()
    fit(trainer, module, ctx=ctx, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    after, final_texts = held_out(module, eval_rows, ctx.seed)
    ctx.log_metrics(after, step=trainer.global_step)

    metrics = {**after, **{f"before/{k}": v for k, v in before.items()}, **module.history[-1],
               "perf/train_seconds": seconds, "train/steps": trainer.global_step}
    outputs = save_policy(module.policy, tokenizer, ctx, spec.peft.method == "lora")
    log_policy_results(ctx, module.history, eval_rows, initial_texts, final_texts, outputs, spec.eval_samples)
    completions = len(module.history) * spec.prompts_per_iteration * spec.group_size * world_size()
    return StepOutput(outputs=outputs, metrics=metrics,
                      info={"iterations": len(module.history), "true_reward": after.get("val/true_reward"),
                            "effort": effort(examples=completions, of="completions")})
