"""`ppo`: optimize a policy against a reward model and/or verifiable rewards with PPO and a KL leash."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import CausalModelRef, OptimizerSpec, Ref, ScheduleSpec, Section, StepSpec
from ..data import PromptDataSpec
from ..peft import PeftSpec

RewardModelRef = Annotated[str | None, Ref("reward_model", external=True),
                           Field(description="A reward_model step, or a folder `./path` / `/path` / `hf:ID`.")]


class RewardFunctionSpec(Section):
    """A verifiable reward: a Python function registered with `@reward(NAME)` in components/lib/rewards.py."""

    function: str
    """Registered name, e.g. `exact_match` (the task mixture's answers) or `contains_answer`."""
    module: str | None = None
    """A Python module to import first, so it can register its own functions."""
    weight: float = 1.0
    """Multiplier on this reward when it is added to the reward model's score."""


class KLSpec(Section):
    """The per-token KL penalty to the frozen reference policy."""

    coef: float = Field(0.05, ge=0)
    """β: initial (adaptive) or fixed penalty coefficient (0.05 in TRL and Huang et al. 2024)."""
    target: float | None = Field(None, gt=0)
    """Adapt β towards this mean summed KL per sequence (Ziegler et al. 2019); null keeps β fixed."""
    horizon: int = Field(10_000, ge=1)
    """Episodes over which the adaptive controller moves β (10000 in Ziegler et al.)."""
    estimator: Literal["k1", "k3"] = "k1"
    """`k1`: log π − log π_ref; `k3`: (ρ − 1) − log ρ with ρ = π_ref/π, never negative."""


class PPOSpec(StepSpec):
    """Proximal policy optimization (Schulman et al. 2017) of a language model, as in Ouyang et al. 2022."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer", "adapter"})
    trains: ClassVar[bool] = True

    kind: Literal["ppo"]
    policy: CausalModelRef
    """The policy to start from (usually the fine-tuned model); the frozen reference is a copy of it."""
    reward_model: RewardModelRef = None
    """Scores prompt+response; its saved reference mean is subtracted to centre rewards."""
    reward: RewardFunctionSpec | None = None
    """A verifiable reward added to (or used instead of) the reward model's score."""
    true_reward: str | None = None
    """A registered function only measured, never optimized (default: `reward.function`, else `exact_match`
    for the builtin prompts, which carry answers); model score up while this goes down is reward hacking."""
    prompts: PromptDataSpec
    """Where the prompts come from."""
    critic: Literal["auto", "reward_model", "value_head"] = "auto"
    """Value function: a copy of the reward model, or a linear head on the policy; `auto` picks the first
    when a reward model is given."""
    peft: PeftSpec = PeftSpec(method="full")
    """`full` or `lora`; with LoRA the reference is the base model with the adapter disabled."""
    optimizer: OptimizerSpec = OptimizerSpec(lr=1e-5)
    """One optimizer over policy and critic."""
    schedule: ScheduleSpec = ScheduleSpec(decay="constant")
    """Learning-rate schedule over all optimizer steps."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    iterations: int = Field(40, ge=1)
    """Rollout-then-update rounds."""
    rollouts: int = Field(32, ge=2)
    """Prompts sampled (one response each) per iteration."""
    epochs: int = Field(4, ge=1)
    """Passes over each rollout batch (4 in TRL)."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per epoch; the batch is reshuffled and split into this many parts."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature, applied alike to rollout, reference and training log-probs."""
    max_new_tokens: int = Field(16, ge=1)
    """Response length limit; responses are cut after their first EOS."""
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    """Subtracted from the score of responses that hit max_new_tokens without an EOS (null: none)."""
    kl: KLSpec = KLSpec()
    """KL penalty settings."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ."""
    clip: float = Field(0.2, gt=0)
    """ε of the clipped policy ratio."""
    value_clip: float = Field(0.2, gt=0)
    """ε_v of the clipped value loss."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE (off in TRL)."""
    normalize_reward: bool = True
    """Divide the centred reward-model score by the RM's held-out reward std, so the score has unit scale
    and `kl.coef` and `missing_eos_penalty` keep their meaning whatever scale the RM learned (as the
    original RLHF code normalises to unit variance on reference samples)."""
    eval_samples: int = Field(16, ge=0)
    """Held-out completions (initial vs final policy) logged as an MLflow table."""
    checkpoint_every: int = Field(10, ge=1)
    """Save a resumable checkpoint every this many iterations."""

    @model_validator(mode="after")
    def _reward_source(self) -> "PPOSpec":
        if self.reward_model is None and self.reward is None:
            raise ValueError("give reward_model, reward: {function: NAME}, or both")
        if self.critic == "reward_model" and self.reward_model is None:
            raise ValueError("critic: reward_model needs a reward_model; use critic: value_head")
        if self.peft.method not in ("full", "lora"):
            raise ValueError(f"peft.method: ppo supports full or lora, got {self.peft.method!r}")
        if self.rollouts < 2 * self.minibatches:
            raise ValueError(f"rollouts ({self.rollouts}) must be at least 2 per minibatch ({self.minibatches})")
        return self

    def outputs(self) -> frozenset[str]:
        return frozenset({"model", "tokenizer"} | ({"adapter"} if self.peft.method == "lora" else set()))

    def why_no(self, output: str) -> str:
        return "ppo writes an adapter only with peft.method lora" if output == "adapter" else ""

    def true_reward_function(self) -> str | None:
        """The reward measured on held-out prompts (`val/true_reward`), or None when there is none."""
        return self.true_reward or (self.reward.function if self.reward else None) or \
            ("exact_match" if self.prompts.builtin else None)

    def plan_details(self) -> dict:
        return {"episodes": self.iterations * self.rollouts,
                "optimizer steps": self.iterations * self.epochs * self.minibatches}
