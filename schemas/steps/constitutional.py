"""`constitutional`: critique -> revision under written principles (SL-CAI), then AI-labelled preferences (RL-CAI)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import CausalModelRef, Input, PromptFiles, Section, TrainingStepSpec
from ..data import one_source
from ..peft import PeftSpec


class PromptsSpec(Section):
    """Prompts to answer: exactly one of `builtin` or `files`."""

    builtin: Literal["red_team", "polite"] | None = None
    """`red_team`: the project's prompts that invite a rude, unsafe or dishonest reply; `polite`: requests
    to word, built from held-out combinations of the task mixture's `polite` task (for a judge fine-tuned
    on that task). Each row carries a reference good/bad reply pair, the ground truth for the AI labels."""
    files: PromptFiles | None = None
    """Globs of JSONL files (relative to the spec) with {prompt} rows; optional {chosen, rejected} reference pairs."""
    limit: int | None = Field(None, ge=2)
    """Use at most this many prompts (the first ones, after a seeded shuffle)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptsSpec":
        one_source(self, ("builtin", "files"))
        return self


class SamplingSpec(Section):
    """How replies, critiques and revisions are sampled."""

    max_new_tokens: int = Field(48, ge=1, le=4096)
    """Longest generated reply, critique or revision."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature (the paper samples critiques and revisions at T=1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off)."""


class FeedbackSpec(Section):
    """RL-CAI: two replies per prompt, labelled by the feedback model's answer to a principle's question."""

    template: str = "Human: {prompt}\n\n{question}\n(A) {a}\n(B) {b}\nAnswer:"
    """The multiple-choice prompt; must contain {question}, {a} and {b} ({prompt} is optional)."""
    options: tuple[str, str] = (" A", " B")
    """The option tokens whose probabilities after the answer cue give the label (each must be one token)."""
    use_reference_pairs: bool = True
    """When a prompt row carries {chosen, rejected}, label that pair (and score agreement with it) instead of
    two samples."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Temperature of the two sampled replies."""

    @model_validator(mode="after")
    def _slots(self) -> "FeedbackSpec":
        missing = [s for s in ("{question}", "{a}", "{b}") if s not in self.template]
        if missing:
            raise ValueError(f"template must contain {', '.join(missing)}")
        if self.options[0] == self.options[1]:
            raise ValueError("options must differ")
        return self


class ConstitutionalSpec(TrainingStepSpec):
    """Constitutional AI (Bai et al. 2022): SL-CAI fine-tuning on revisions, RL-CAI preference labels."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer", "data"})

    kind: Literal["constitutional"]
    model: CausalModelRef
    """The policy: it answers, critiques and revises, and is fine-tuned on its final revisions."""
    feedback_model: CausalModelRef | None = None
    """The judge for RL-CAI labels (default: the policy)."""
    constitution: Annotated[str | None, Input(rows="constitution")] = None
    """YAML file of principles (relative to the spec); default: the constitution shipped with llmcycle."""
    principles: list[str] | None = None
    """Use only these principles of the constitution (default: all)."""
    prompts: PromptsSpec = PromptsSpec(builtin="red_team")
    """The prompts to answer."""
    few_shot: int = Field(0, ge=0, le=16)
    """Few-shot transcripts from the constitution's `examples` prepended to every critique context."""
    rounds: int = Field(1, ge=1, le=8)
    """Critique/revision rounds per prompt; each draws a principle uniformly at random."""
    sampling: SamplingSpec = SamplingSpec()
    """Sampling of replies, critiques and revisions."""
    sft_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of prompts whose transcripts form the SFT half; the rest form the preference half (disjoint)."""
    max_length: int = Field(256, ge=16)
    """Tokens per fine-tuning example (prompt cut from the left, then the revision from the right)."""
    peft: PeftSpec = PeftSpec()
    """Which parameters the SL-CAI fine-tune trains (a merged model is always written)."""
    feedback: FeedbackSpec | None = FeedbackSpec()
    """RL-CAI labelling on the preference half (null: write the revision-over-initial pairs instead)."""

    @model_validator(mode="after")
    def _consistent(self) -> "ConstitutionalSpec":
        if self.peft.method == "prompt_tuning":
            raise ValueError("peft method prompt_tuning has no merged form; the constitutional step must write a "
                             "model, so use lora, ia3, bitfit, full or prune")
        if self.principles is not None and len(set(self.principles)) != len(self.principles):
            raise ValueError("principles lists a name twice")
        return self

    def outputs(self) -> frozenset[str]:
        return frozenset({"model", "tokenizer", "data"} | ({"adapter"} if self.peft.is_adapter else set()))

    def why_no(self, output: str) -> str:
        return f"peft method {self.peft.method} leaves no adapter" if output == "adapter" else ""

    def plan_details(self) -> dict:
        judge = self.feedback_model or "the policy"
        return {"sl-cai": f"{self.rounds} round(s) of critique/revision, fine-tune with {self.peft.method}",
                "rl-cai": f"labels by {judge}" if self.feedback else "revision-over-initial pairs"}
