"""`evaluate`: perplexity and next-token accuracy, prompted tasks, decoding samples and embeddings of a model."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..base import CausalModelRef, InputFile, ModelRef, Ref, ReferenceFiles, Section, StepSpec, TaskFile
from ..data import BuiltinTask, one_source
from .evaluate_inspection import AttentionSpec, DimensionsSpec, ProjectorSpec, SentencesSpec, parse_analogy

# The builtin tasks whose answers are several words: ROUGE and BLEU give partial credit there.
REFERENCE_TASKS = ["copy", "reverse", "capitalize"]

TokensRef = Annotated[str, Ref("tokens", heldout=True)]


class TaskExample(Section):
    """One question of a prompted task."""

    prompt: str
    """Text the model continues."""
    answer: str
    """The correct continuation (for choice tasks: one of `choices`)."""
    choices: list[str] | None = None
    """Candidate continuations, scored by log-likelihood (multiple choice)."""


class TaskSpec(Section):
    """A prompted task: multiple choice by log-likelihood, or exact match of a generated answer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Task name (metrics are `tasks/<k>shot/<name>`)."""
    type: Literal["choice", "exact_match"] = "choice"
    """`choice`: pick the choice with the highest log-likelihood; `exact_match`: generate greedily and compare."""
    examples: list[TaskExample] | None = None
    """Examples written in the spec."""
    file: TaskFile | None = None
    """A JSONL file of examples (`prompt`, `answer`, optional `choices`), relative to the spec."""
    max_new_tokens: int = Field(16, ge=1)
    """Tokens to generate for exact_match."""

    @model_validator(mode="after")
    def _source(self) -> "TaskSpec":
        if (self.examples is None) == (self.file is None):
            raise ValueError(f"task '{self.name}': give exactly one of examples or file")
        for i, ex in enumerate(self.examples or []):
            if self.type == "choice" and (not ex.choices or ex.answer not in ex.choices):
                raise ValueError(f"task '{self.name}' example {i}: a choice task needs choices that include the answer")
        return self


class TasksSpec(Section):
    """Prompted evaluation: tasks defined here or in JSONL, and the builtin task mixture."""

    items: list[TaskSpec] = []
    """Tasks defined in the spec or in JSONL files."""
    builtin: Literal["tasks"] | None = None
    """`tasks`: the project's builtin task mixture (components/lib/tasks.py), scored by exact match."""
    tasks: list[BuiltinTask] | None = None
    """Builtin only: which tasks of the mixture (default: all)."""
    n_per_task: int = Field(8, ge=1)
    """Examples per builtin task."""
    shots: int = Field(0, ge=0, le=32)
    """Solved examples of the same task put before each question (0: zero-shot)."""
    separator: str = "\n\n"
    """Text between the few-shot examples and the question."""


class GenerationSpec(Section):
    """Sample continuations of prompts with each decoding strategy."""

    prompts: list[str] = Field(min_length=1)
    """Prompts to continue."""
    strategies: list[Literal["greedy", "sample", "top_k", "top_p", "beam"]] = \
        ["greedy", "sample", "top_k", "top_p", "beam"]
    """Decoding strategies to compare."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Tokens to generate per prompt."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature for the sampling strategies."""
    top_k: int = Field(20, ge=1)
    """k of top-k sampling."""
    top_p: float = Field(0.9, gt=0, le=1)
    """p of nucleus (top-p) sampling."""
    num_beams: int = Field(4, ge=1)
    """Beams of beam search."""
    length_penalty: float = 1.0
    """Beam scores are sum(log p) / length^length_penalty (0: raw sum)."""


class EmbeddingsSpec(Section):
    """Inspect the embeddings: nearest tokens, a 2-D projection, analogies, sentence vectors and a probe, the
    Embedding Projector export and the high-dimension argument (components/evaluate/embeddings.py)."""

    words: list[str] = []
    """Words whose nearest tokens (cosine similarity) to list."""
    k: int = Field(5, ge=1, le=100)
    """Neighbours per word, and answers listed per analogy."""
    plot_tokens: int = Field(300, ge=2)
    """Tokens drawn in the 2-D PCA projection (the first ids after the specials)."""
    analogies: list[str] = []
    """Word analogies 'a - b + c = d' over the input embeddings (3CosAdd on unit vectors, Mikolov et al. 2013;
    a, b and c are not answers): each row lists the top-k answers and the rank of d, solved or not."""
    sentences: SentencesSpec | None = None
    """Mean-pooled sentence embeddings, a linear probe on them and nearest texts (null: none)."""
    projector: ProjectorSpec | None = None
    """Write the token (and sentence) vectors for the TensorBoard Embedding Projector (null: none)."""
    dimensions: DimensionsSpec | None = None
    """Plot random vectors' |cos| and sums against dimension, and the hypercube's corners (null: none)."""

    @field_validator("analogies")
    @classmethod
    def _analogies(cls, items: list[str]) -> list[str]:
        for item in items:
            parse_analogy(item)
        return items


class ReferenceExample(Section):
    """A prompt and the text(s) a good generation resembles."""

    prompt: str
    """Text the model continues."""
    reference: str | list[str]
    """The reference continuation, or several (each metric takes the best match, as its library does)."""


class RougeSettings(Section):
    """rouge-score's settings (Lin 2004; `rouge_score.rouge_scorer.RougeScorer`)."""

    use_stemmer: bool = False
    """Porter-stem tokens longer than 3 characters before matching (rouge-score's default: off)."""


class BleuSettings(Section):
    """sacrebleu's BLEU settings (Papineni et al. 2002; Post 2018); the defaults are sacrebleu's."""

    tokenize: Literal["13a", "none", "intl", "char", "zh", "ja-mecab", "ko-mecab", "flores101", "flores200"] = "13a"
    """Tokenizer applied to hypothesis and references (`13a`: mteval's, splits punctuation)."""
    smooth_method: Literal["exp", "floor", "add-k", "none"] = "exp"
    """Smoothing of zero n-gram matches (Chen & Cherry 2014)."""
    lowercase: bool = False
    """Compare case-insensitively."""


class ChrfSettings(Section):
    """sacrebleu's chrF settings (Popović 2015)."""

    word_order: int = Field(0, ge=0, le=2)
    """Word n-gram order added to the character n-grams (2: chrF++)."""


class ReferencesSpec(Section):
    """Generate a reply to each prompt and score it against references: ROUGE, BLEU, chrF, exact match.

    Computed by the reference implementations (rouge-score, sacrebleu), not re-implemented; their settings are
    logged as tags of the step's run (`references.*`)."""

    builtin: Literal["tasks"] | None = None
    """`tasks`: held-out rows of the builtin mixture; the references are the answers."""
    tasks: list[BuiltinTask] | None = None
    """Builtin only: which tasks (default: the multi-word ones, copy, reverse and capitalize)."""
    n_per_task: int = Field(20, ge=1)
    """Builtin only: held-out rows per task."""
    files: ReferenceFiles | None = None
    """JSONL files of {prompt, reference} rows (reference: a string or a list of strings), relative to the spec."""
    examples: list[ReferenceExample] | None = None
    """Rows written in the spec."""
    metrics: list[Literal["rouge", "bleu", "chrf", "exact_match"]] = ["rouge", "bleu", "chrf", "exact_match"]
    """Which metrics to compute."""
    max_new_tokens: int = Field(32, ge=1, le=1024)
    """Tokens generated per prompt (greedy)."""
    stop: Literal["line", "eos"] = "line"
    """`line`: the reply is the first line (the builtin tasks' format); `eos`: everything up to EOS."""
    rouge: RougeSettings = RougeSettings()
    """rouge-score settings."""
    bleu: BleuSettings = BleuSettings()
    """sacrebleu BLEU settings."""
    chrf: ChrfSettings = ChrfSettings()
    """sacrebleu chrF settings."""

    @model_validator(mode="after")
    def _source(self) -> "ReferencesSpec":
        one_source(self, ("builtin", "files", "examples"), frozenset({"tasks", "n_per_task"}), "tasks")
        return self

    def builtin_tasks(self) -> list[str]:
        return list(self.tasks or REFERENCE_TASKS)


class LmEvalSpec(Section):
    """EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`, the `hf` backend) on the step's model.

    Tasks come from the harness's registry (hub datasets: they need the network), from llmcycle's own task
    folder (always included: `llmcycle_sentiment`, multiple choice; `llmcycle_pydoc`, rolling log-likelihood;
    both offline) and from `include_path`."""

    tasks: list[str] = Field(min_length=1)
    """Task or group names, as `lm_eval --tasks` takes them."""
    include_path: InputFile | None = None
    """A folder of task YAML files of your own, relative to the spec."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per question (null: each task's own default)."""
    limit: int | None = Field(None, ge=1)
    """Documents per task at most (null: all)."""
    batch_size: int = Field(8, ge=1)
    """Requests per forward pass."""


class JudgeSpec(Section):
    """LLM-as-judge (Zheng et al. 2023) on the replies of `references`: a judge model answers a multiple-choice
    question, and its label is the softmax over the two options' log-probabilities (the constitutional step's
    judging code, components/lib/judging.py).

    - `pointwise`: "is this reply good?" per reply; agreement = the judge's verdict matches exact match with the
      reference.
    - `pairwise`: the reply against the reference; win rate = how often the judge prefers the reply; agreement =
      how often it prefers the reference over a reply that does not match it.
    `swap_positions` asks every question in both orders and averages, so position bias cancels out; the bias
    itself (mean p(first option) - 0.5) is reported either way."""

    model: CausalModelRef
    """The judge: a step's model, `hf:ID`, a folder or a registered model."""
    rubric: str = "Is the reply a correct and complete answer to the request?"
    """The judge's question."""
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    """`pairwise`: reply vs reference; `pointwise`: each reply alone."""
    swap_positions: bool = True
    """Ask in both orders (A/B swapped) and average the two labels."""
    template: str | None = None
    """The judge's prompt (null: a default per mode). Slots: {rubric}, {prompt}, and {a}, {b} (pairwise) or
    {reply} (pointwise)."""
    options: tuple[str, str] = (" A", " B")
    """The two answer tokens whose probabilities give the label (pointwise: A = good, B = not good)."""
    batch_size: int = Field(16, ge=1)
    """Judge prompts per forward pass."""

    @model_validator(mode="after")
    def _template(self) -> "JudgeSpec":
        if self.options[0] == self.options[1]:
            raise ValueError("options must differ")
        if self.template is not None:
            slots = ["{a}", "{b}"] if self.mode == "pairwise" else ["{reply}"]
            missing = [s for s in slots if s not in self.template]
            if missing:
                raise ValueError(f"template must contain {', '.join(missing)} in {self.mode} mode")
        return self


class EvaluateSpec(StepSpec):
    """Measure a model: perplexity, next-token and masked-token accuracy, tasks, decoding, embeddings."""

    produces: ClassVar[frozenset[str]] = frozenset({"metrics"})

    kind: Literal["evaluate"]
    model: ModelRef
    """The model to evaluate."""
    tokens: TokensRef | None = None
    """A tokenize step whose held-out (`val`) token file to score."""
    split: Literal["val", "train"] = "val"
    """Which token file of `tokens` to score."""
    texts: list[str] | None = None
    """Texts to score instead of (or besides) token files."""
    context: int | None = Field(None, ge=8)
    """Block length for scoring (null: the model's maximum, at most 512)."""
    batch_size: int = Field(8, ge=1)
    """Blocks per forward pass."""
    max_batches: int = Field(16, ge=1)
    """Batches of blocks scored at most."""
    tasks: TasksSpec | None = None
    """Prompted tasks (null: none)."""
    generation: GenerationSpec | None = None
    """Decoding samples (null: none; causal models only)."""
    embeddings: EmbeddingsSpec | None = None
    """Embedding inspection (null: none)."""
    attention: AttentionSpec | None = None
    """Attention maps and previous-token scores, trained vs freshly initialised (null: none; transformers only)."""
    references: ReferencesSpec | None = None
    """Generated replies scored against references: ROUGE, BLEU, chrF, exact match (null: none)."""
    lm_eval: LmEvalSpec | None = None
    """Tasks of the lm-evaluation-harness (null: none)."""
    judge: JudgeSpec | None = None
    """A judge model scores the replies of `references` (null: none)."""

    @model_validator(mode="after")
    def _judge_needs_replies(self) -> "EvaluateSpec":
        if self.judge is not None and self.references is None:
            raise ValueError("judge scores the replies that `references` generates: add a references section")
        return self

    def reads_heldout(self, path: tuple, ref: Ref) -> bool:
        return ref.heldout and self.split == "val"

    def plan_details(self) -> dict[str, str]:
        out = {}
        if (r := self.references) is not None:
            rows = f"builtin {'/'.join(r.builtin_tasks())} x{r.n_per_task}" if r.builtin else \
                (f"{len(r.files)} file glob(s)" if r.files else f"{len(r.examples)} rows")
            out["references"] = f"{rows}: {', '.join(r.metrics)}"
        if self.judge is not None:
            out["judge"] = f"{self.judge.model}, {self.judge.mode}" + (", both orders" if self.judge.swap_positions
                                                                          else "")
        if self.lm_eval is not None:
            out["lm_eval"] = ", ".join(self.lm_eval.tasks) + (f" (limit {self.lm_eval.limit})" if self.lm_eval.limit
                                                              else "")
        return out

