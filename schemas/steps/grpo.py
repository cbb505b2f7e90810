"""`grpo`: critic-free policy optimization with group-relative advantages (GRPO and its DAPO, Dr. GRPO, GSPO,
RLOO variants), on verifiable rewards, a reward model, or your own reward functions."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from ..base import CausalModelRef, OptimizerSpec, Ref, ScheduleSpec, Section, StepSpec
from ..data import PackedBatches, PackingSpec, PromptDataSpec
from ..peft import PeftSpec

FUNCTION = r"^[A-Za-z_][A-Za-z0-9_.]*(:[A-Za-z_][A-Za-z0-9_]*)?$"
RESERVED = ("mean", "true_reward", "overlong")  # reward/<name> metrics the step reports itself


def _function_name(value: str) -> str:
    if not re.fullmatch(FUNCTION, value):
        raise ValueError(f"expected a registered reward name (exact_match) or module:function, got {value!r}")
    return value


RewardFunction = Annotated[str, AfterValidator(_function_name), Field(json_schema_extra={"pattern": FUNCTION})]


class RewardSourceSpec(Section):
    """One reward source: a verifiable function or a reward model, with its weight in the summed reward."""

    function: RewardFunction | None = None
    """A function registered in components/lib/rewards.py (`exact_match`, `contains_answer`, `length_penalty`), or
    `module:function` from `module.py` beside the spec, which imports and runs your code (as TRL's `reward_funcs`
    do): it takes (prompt, completion, row) and returns a float, or None for a completion it does not score."""
    reward_model: Annotated[str | None, Ref("reward_model", external=True)] = None
    """A reward_model step, or a folder `./path` / `/path` / `hf:ID`: its score minus its reference mean, over its
    held-out std (as ppo)."""
    weight: float = 1.0
    """w_k in the reward r = Σ_k w_k·r_k (TRL's `reward_weights`)."""
    name: str | None = Field(None, pattern=r"^[a-z0-9_]+$")
    """Its metric `reward/<name>` (default: the function's name, lowercased; `model_score` for a reward model)."""

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSourceSpec":
        if (self.function is None) == (self.reward_model is None):
            raise ValueError("give exactly one of function or reward_model")
        return self

    def metric_name(self) -> str:
        """The `<name>` of this source's `reward/<name>` metric."""
        if self.name:
            return self.name
        if self.reward_model is not None:
            return "model_score"
        return re.sub(r"[^a-z0-9_]", "_", self.function.split(":")[-1].lower())


class ClipSpec(Section):
    """The range [1 − low, 1 + high] the importance ratio is clipped to."""

    low: float = Field(0.2, gt=0, lt=1)
    """ε_low (TRL `epsilon`, 0.2)."""
    high: float = Field(0.2, gt=0)
    """ε_high (TRL `epsilon_high`, which defaults to `epsilon`); DAPO's clip-higher uses 0.28, GSPO 4e-4 with
    low 3e-4, as its sequence-level ratio stays near 1."""


class GrpoKLSpec(Section):
    """The per-token KL term to the reference (the starting policy) added to the loss, as TRL's GRPOTrainer."""

    coef: float = Field(0.0, ge=0)
    """β. 0 as in TRL (`beta=0.0`): DAPO, Dr. GRPO and Open-Reasoner-Zero found the term unnecessary with
    verifiable rewards, where there is no learned reward to exploit (DeepSeekMath used 0.04). Raise it with a
    reward model. The KL is measured (`grpo/kl`, `val/kl`) either way."""
    estimator: Literal["k1", "k3"] = "k3"
    """`k3` = e^(ref−logπ) − (ref−logπ) − 1, never negative (TRL, DeepSeekMath); `k1` = logπ − ref, whose
    gradient as a loss term averages to 0 on-policy, so it restrains only off-policy passes."""


class SoftPunishmentSpec(Section):
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's `get_soft_overlong_punishment`)."""

    max_len: int | None = Field(None, ge=1)
    """L_max: completions longer than this score −1 (default: max_new_tokens)."""
    cache: int = Field(ge=0)
    """L_cache: from L_max − L_cache tokens on, the reward falls linearly from 0 to −1 at L_max."""


class OverlongSpec(Section):
    """DAPO's overlong reward shaping (Yu et al. 2025, §3.4)."""

    filter: bool = False
    """Leave completions that hit max_new_tokens without an EOS out of the loss (TRL `mask_truncated_completions`);
    they still count in their group's mean and std."""
    soft_punishment: SoftPunishmentSpec | None = None
    """A length penalty added to the reward as source `overlong` (weight 1); null: none."""


class GrpoSpec(PackedBatches, StepSpec):
    """Group-relative policy optimization (Shao et al. 2024) and its variants, as TRL's GRPOTrainer computes them."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer", "adapter"})
    trains: ClassVar[bool] = True

    kind: Literal["grpo"]
    policy: CausalModelRef
    """The policy to start from (usually the fine-tuned model); it is also the KL reference."""
    rewards: list[RewardSourceSpec] = Field(min_length=1)
    """Reward sources, summed with their weights; each is logged as `reward/<name>`."""
    true_reward: RewardFunction | None = None
    """A reward function only measured, never optimized (default: the first `function` source, else `exact_match`
    for the builtin prompts); model score up while this goes down is reward hacking."""
    prompts: PromptDataSpec
    """Where the prompts come from."""
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt, whose rewards are compared (TRL `num_generations`, 8)."""
    prompts_per_iteration: int = Field(4, ge=1)
    """Prompts per iteration: G × this many completions (4 × 8 = ppo's 32 rollouts per iteration)."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """`grpo`: (r − mean)/(std + 1e-4), std Bessel-corrected over the group (TRL `scale_rewards="group"`);
    `dr_grpo`: r − mean (Dr. GRPO, TRL `scale_rewards="none"`); `rloo`: r − mean of the other G − 1 (RLOO)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "gspo"] = "dapo"
    """Aggregation of the per-token clipped loss: `grpo` mean over sequences of each one's token mean;
    `dr_grpo` sum / (B × max_new_tokens); `dapo` sum / active tokens (TRL's default: no length bias); `gspo` a
    sequence-level ratio exp(mean_t log r), aggregated as `grpo`."""
    clip: ClipSpec = ClipSpec()
    """Ratio clipping."""
    kl: GrpoKLSpec = GrpoKLSpec()
    """KL term to the reference."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (they have no advantage), counted in
    `grpo/zero_std_fraction`; DAPO refills the batch, this trains on the groups left."""
    overlong: OverlongSpec = OverlongSpec()
    """DAPO's overlong filtering and soft punishment."""
    iterations: int = Field(40, ge=1)
    """Sample-then-update rounds."""
    epochs: int = Field(1, ge=1)
    """Passes over each batch (TRL `num_iterations` μ, 1: on-policy, the ratio stays 1)."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass; the batch is reshuffled and split into this many parts."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (TRL's 1.0), applied alike to rollout, reference and training log-probs."""
    max_new_tokens: int = Field(16, ge=1)
    """Completion length limit (TRL `max_completion_length`); completions are cut after their first EOS."""
    peft: PeftSpec = PeftSpec(method="full")
    """`full` or `lora`; with LoRA the reference is the base model with the adapter disabled."""
    optimizer: OptimizerSpec = OptimizerSpec(lr=1e-5)
    """Optimizer over the policy."""
    schedule: ScheduleSpec = ScheduleSpec(decay="constant")
    """Learning-rate schedule over all optimizer steps."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    eval_samples: int = Field(16, ge=0)
    """Held-out completions (initial vs final policy) logged as an MLflow table."""
    checkpoint_every: int = Field(10, ge=1)
    """Save a resumable checkpoint every this many iterations."""
    packing: bool | PackingSpec = False
    """Run the policy's and reference's log-prob passes on each episode's real tokens only (prompt without its
    left padding, completion up to its first EOS), packed into rows no longer than the padded batch (true:
    `padding_free`), or a `{strategy: padding_free, length}` section. Generation is unchanged; the log-probs,
    and so the loss, are those of the padded batch."""

    @model_validator(mode="after")
    def _consistent(self) -> "GrpoSpec":
        if problem := self.packing_problem():
            raise ValueError(problem)
        if self.peft.method not in ("full", "lora"):
            raise ValueError(f"peft.method: grpo supports full or lora, got {self.peft.method!r}")
        if sum(r.reward_model is not None for r in self.rewards) > 1:
            raise ValueError("rewards: give at most one reward_model source (val/model_score reports its score)")
        names = [r.metric_name() for r in self.rewards]
        taken = [n for n in names if names.count(n) > 1 or n in RESERVED]
        if taken:
            raise ValueError(f"rewards: each source's metric name must be unique and none of {', '.join(RESERVED)}; "
                             f"got {', '.join(dict.fromkeys(taken))} (set `name:` on the source)")
        soft = self.overlong.soft_punishment
        if soft is not None and soft.cache > (soft.max_len or self.max_new_tokens):
            raise ValueError(f"overlong.soft_punishment.cache ({soft.cache}) must be at most max_len "
                             f"({soft.max_len or self.max_new_tokens})")
        if self.minibatches > self.prompts_per_iteration * self.group_size:
            raise ValueError(f"minibatches ({self.minibatches}) must be at most the completions per iteration "
                             f"({self.prompts_per_iteration} x {self.group_size})")
        return self

    def outputs(self) -> frozenset[str]:
        return frozenset({"model", "tokenizer"} | ({"adapter"} if self.peft.method == "lora" else set()))

    def why_no(self, output: str) -> str:
        return "grpo writes an adapter only with peft.method lora" if output == "adapter" else ""

    def reward_names(self) -> list[str]:
        """The `<name>` of every `reward/<name>` source metric, `overlong` included when it is on."""
        extra = ["overlong"] if self.overlong.soft_punishment is not None else []
        return [r.metric_name() for r in self.rewards] + extra

    def true_reward_function(self) -> str | None:
        """The reward measured on held-out prompts (`val/true_reward`), or None when there is none."""
        first = next((r.function for r in self.rewards if r.function), None)
        return self.true_reward or first or ("exact_match" if self.prompts.builtin else None)

    def input_globs(self) -> list[str]:
        """Input files, and the Python files of `module:function` rewards (editing one re-runs the step)."""
        refs = [r.function for r in self.rewards if r.function] + [self.true_reward or ""]
        files = [f"{ref.split(':')[0].replace('.', '/')}.py" for ref in refs if ":" in ref]
        return super().input_globs() + list(dict.fromkeys(files))

    def plan_details(self) -> dict:
        completions = self.iterations * self.prompts_per_iteration * self.group_size
        return {"completions": completions, "generated tokens (at most)": completions * self.max_new_tokens,
                "optimizer steps (at most)": self.iterations * self.epochs * self.minibatches}
