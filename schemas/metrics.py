"""Every metric each step kind reports, by name: the source of the README's table, of the check that a gate
names a metric its step will emit, and of the test that each kind emits exactly these.

The names follow one scheme:
- `train/<m>`: measured on training data (curves during training; the last value at the end);
- `val/<m>`: measured on held-out data: curves during training, and the step's result at the end;
- `before/<m>`: the same held-out measurement `<m>` on the model the step started from, and `gain/<m>` =
  `<m>` - `before/<m>` where that difference is the point (task accuracy);
- `<split>/<m>`, `texts/<m>`, `tasks/<k>shot/<task>`, `embeddings/<m>`, `attention/<m>`: what `evaluate` measured,
  and `fresh/<m>`: the same on a freshly initialised model of the same config and seed;
- groups for facts and speed: `data/`, `params/`, `perf/`, `time/`; kinds' own groups: `collect/`, `ppo/`, `grpo/`,
  `reward/`, `labels/`, `sl/`, `drift/`, `schema/`, `gate/`, `registry/`, `prune/`, `forgetting/`, `scaling/` and
  `isoflop/` (the scaling step's approaches 3 and 2), optimize's
  variants `baseline/`, `pruned/`, `bf16/`, `fp16/`, `int8/`, `int4/`, and distill's `teacher/<m>` and
  `hard/<m>` (the same measurement of the teacher and of the hard-label twin).

A name may hold placeholders filled from the step's settings: `{split}`, `{k}` (shots), `{task}`,
`{variant}` (optimize's `baseline` and each `{derived}` variant made from it), `{source}` (grpo's reward
sources); `*` stands for a part known
only from the data (a task name in the rows of a JSONL file).
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from .data import BUILTIN_TASKS

ALWAYS: Callable[[Any, Any], bool] = lambda spec, up: True  # noqa: E731


@dataclass(frozen=True)
class Metric:
    """One metric of a kind: its name (with placeholders), what it measures, and when it is reported."""

    name: str
    doc: str
    when: str = ""
    """When it is reported, in words ("" : always)."""
    test: Callable[[Any, Any], bool | None] = field(default=ALWAYS, compare=False)
    """(spec, upstream) -> True: the settings make the step report it; None: they allow it and the data or a
    model from outside the pipeline decides; False: not reported. upstream(name) gives another step's spec."""


def _m(name, doc, when="", test=ALWAYS) -> Metric:
    return Metric(name, doc, when, test)


TIME = _m("time/seconds", "wall time of the step's run, in seconds")
PERF = [_m("perf/tokens_per_s", "training tokens per second (this attempt, all processes, validation rounds "
                                    "excluded)"),
        _m("perf/flops_per_s", "achieved training FLOP/s, 6 x parameters x tokens/s (Kaplan et al. 2020)")]


def _objective(spec, up) -> str | None:
    """The objective the model an evaluate step reads was pretrained with, `causal`, `masked` or `span_corruption`,
    through the steps it descends from (None: from outside the pipeline, unknown; a tuned model whose pretraining
    the pipeline does not show: causal)."""
    step, seen = up(spec.model), {spec.model}
    if step is None:
        return None
    while step.kind != "pretrain":
        parent = next((getattr(step, f) for f in ("model", "policy") if isinstance(getattr(step, f, None), str)), None)
        if parent is None or parent in seen or up(parent) is None:
            return "causal"
        seen.add(parent)
        step = up(parent)
    return step.objective


def _score(prefix: str, when: str, test) -> list[Metric]:
    def trained_on(objective: str):
        return lambda s, u: test(s, u) and (None if _objective(s, u) is None else _objective(s, u) == objective)

    causal, masked, spans = trained_on("causal"), trained_on("masked"), trained_on("span_corruption")
    return [
        _m(f"{prefix}/loss", "mean negative log-likelihood per predicted token (causal: every token of every "
           "document once, after BOS; masked: the masked tokens; t5: the targets of T5's span corruption, "
           "sentinels and EOS included)", when, test),
        _m(f"{prefix}/perplexity", "exp of that loss (components/lib/scoring.py)", when, test),
        _m(f"{prefix}/tokens", "tokens predicted", when, test),
        _m(f"{prefix}/next_token_top1", "share of tokens the model ranks first (causal models)", when, causal),
        _m(f"{prefix}/next_token_top5", "share of tokens in the model's top 5 (causal models)", when, causal),
        _m(f"{prefix}/masked_accuracy", "share of masked tokens ranked first (masked models)", when, masked),
        _m(f"{prefix}/masked_top5", "share of masked tokens in the top 5 (masked models)", when, masked),
        _m(f"{prefix}/span_top1", "share of span-corruption target tokens ranked first (encoder-decoders)", when,
           spans),
        _m(f"{prefix}/span_top5", "share of span-corruption target tokens in the top 5 (encoder-decoders)", when,
           spans),
    ]


def _tasks(prefix: str, when: str, test) -> list[Metric]:
    whose = {"": "", "before/": " of the model before tuning",
             "gain/": ": after minus before (tasks/... - before/tasks/...)"}[prefix]
    return [_m(f"{prefix}tasks/{{k}}shot/accuracy", "exact match (or choice) accuracy over every question, "
               f"with k solved examples first{whose}", when, test),
            _m(f"{prefix}tasks/{{k}}shot/{{task}}", f"the same for one task{whose}", when, test)]


def _loop(val: bool = True) -> list[Metric]:
    out = [_m("train/loss", "training loss at the last logged step"),
           _m("train/steps", "optimizer steps taken")]
    if val:
        out += [_m("val/loss", "held-out loss at the last validation"),
                _m("val/perplexity", "exp of val/loss")]
    return out


PARAMS = [_m("params/trainable", "parameters that train"), _m("params/total", "all parameters of the model")]
PADDING = _m("data/padding_share", "share of the positions of right-padded training batches that would be padding "
             "(what `packing` saves)")
MIXED = lambda s, u: s.data.mixture is not None  # noqa: E731
MIXTURE = [_m("data/mixture/{source}", "share of the training rows drawn from this source of the mixture (of the "
              "rows drawn per pass; streamed data: of those drawn for the steps trained)", "data.mixture", MIXED),
           _m("data/mixture/{source}/rows", "training rows drawn from it (the same count)", "data.mixture", MIXED)]
HAS_EVAL = lambda s, u: s.evaluation is not None  # noqa: E731
HAS_BASE = lambda s, u: s.evaluation is not None and s.evaluation.base  # noqa: E731
FORGET = lambda s, u: s.evaluation is not None and s.tokens is not None  # noqa: E731
FORGET_BASE = lambda s, u: FORGET(s, u) and s.evaluation.base  # noqa: E731
TRUE = lambda s, u: s.true_reward_function() is not None  # noqa: E731
# builtin prompts all carry a reference pair; in a file, the rows decide
REFERENCE_PAIRS = lambda s, u: s.feedback is not None and s.feedback.use_reference_pairs and \
    (True if s.prompts.builtin else None)  # noqa: E731
RM = lambda s, u: s.reward_model is not None  # noqa: E731
SHEET = lambda s, u: s.data.sheet is not None  # noqa: E731
POINTWISE = lambda s, u: s.data.sheet is not None and s.data.sheet.pointwise()  # noqa: E731
BASELINE = lambda s, u: s.baseline  # noqa: E731
ON_POLICY = lambda s, u: s.on_policy is not None  # noqa: E731
# a data batch surely comes without on_policy; with it, the draws decide (none at all with lmbda 1)
DATA_BATCHES = lambda s, u: True if s.on_policy is None else (None if s.on_policy.lmbda < 1 else False)  # noqa: E731

PPO_VAL = [("score", "mean reward the policy is trained on", "", ALWAYS),
           ("model_score", "mean reward-model score, centred and scaled", "reward_model", RM),
           ("true_reward", "mean true reward (measured only, never optimized)", "a true reward", TRUE),
           ("kl", "mean summed KL to the reference per reply", "", ALWAYS),
           ("length", "mean reply length in tokens", "", ALWAYS),
           ("true_reward_greedy", "true reward of greedy replies", "a true reward", TRUE),
           ("model_score_greedy", "reward-model score of greedy replies", "reward_model", RM)]
PPO_ITER = ["kl", "beta", "non_score_reward", "entropy", "clipfrac", "approx_kl", "ratio", "policy_loss",
            "value_loss", "value_clipfrac", "explained_variance", "response_length", "eos_fraction"]

GRPO_RM = lambda s, u: any(r.reward_model is not None for r in s.rewards)  # noqa: E731
GRPO_VAL = [(n, d, w, GRPO_RM if t is RM else t) for n, d, w, t in PPO_VAL]
GRPO_ITER = [
    ("kl", "mean summed KL to the reference per completion (kl.estimator)"),
    ("entropy", "mean per-token entropy of the sampling distribution"),
    ("clip_fraction", "share of active tokens whose ratio is clipped (low with A < 0 or high with A > 0), mean "
     "over the updates"), ("clip_low_fraction", "the same, below 1 - clip.low"),
    ("clip_high_fraction", "the same, above 1 + clip.high"), ("ratio", "mean importance ratio (1 on-policy)"),
    ("approx_kl", "mean 0.5 (log pi - log pi_old)^2 over the updates"), ("policy_loss", "mean loss over the updates"),
    ("zero_std_fraction", "share of groups whose rewards are all equal (no advantage)"),
    ("reward_std", "mean within-group standard deviation of the reward"),
    ("completion_length", "mean completion length in tokens, EOS included"),
    ("truncated_fraction", "share of completions that hit max_new_tokens without an EOS"),
    ("padding_share", "share of the padded batch's positions (prompts' left padding, completions past their "
     "EOS) that are padding: what `packing` leaves out of the log-prob passes")]

# a CSV's labels decide the task when the spec leaves it out (None: known only from the data)
FF_CLASSIFIES = lambda s, u: None if s.inferred_task() is None else s.inferred_task() == "classification"  # noqa: E731
FF_REGRESSES = lambda s, u: None if s.inferred_task() is None else s.inferred_task() == "regression"  # noqa: E731
HAS_REFS = lambda s, u: s.references is not None  # noqa: E731


def _uses(metric: str):
    return lambda s, u: s.references is not None and metric in s.references.metrics


REFERENCES = [
    *[_m(f"references/{n}", f"{d}, mean over rows (rouge-score)", "references, metrics has rouge", _uses("rouge"))
      for n, d in (("rouge1", "ROUGE-1 F"), ("rouge2", "ROUGE-2 F"), ("rouge_l", "ROUGE-L F (longest common "
                   "subsequence)"), ("rouge_lsum", "ROUGE-Lsum F (union LCS over lines)"))],
    _m("references/bleu", "corpus BLEU, 0-100 (sacrebleu; its signature is the tag references.bleu)",
       "references, metrics has bleu", _uses("bleu")),
    _m("references/chrf", "corpus chrF, 0-100 (sacrebleu; signature in the tag references.chrf)",
       "references, metrics has chrf", _uses("chrf")),
    _m("references/exact_match", "share of replies whose first line equals a reference", "references, metrics "
       "has exact_match", _uses("exact_match")),
    _m("references/rows", "rows replied to and scored", "references", HAS_REFS)]
HAS_JUDGE = lambda s, u: s.judge is not None  # noqa: E731
JUDGE = [
    _m("judge/score", "pairwise: mean p(reply better than the reference); pointwise: mean p(reply good)", "judge",
       HAS_JUDGE),
    _m("judge/agreement", "pointwise: share of verdicts matching exact match; pairwise: share of non-matching "
       "replies where the judge prefers the reference", "judge (rows that allow it)",
       lambda s, u: None if s.judge is not None else False),
    _m("judge/position_bias", "mean p(first option) - 0.5 over every question asked", "judge", HAS_JUDGE),
    _m("judge/questions", "questions the judge answered (x2 with swap_positions)", "judge", HAS_JUDGE)]

def _section(*path: str):
    """Whether evaluate's settings hold the (nested) section `path`, e.g. ("embeddings", "sentences")."""
    def test(s, u) -> bool:
        for name in path:
            s = getattr(s, name, None)
            if not s:
                return False
        return True
    return test


SENTENCES, ANALOGIES = _section("embeddings", "sentences"), _section("embeddings", "analogies")
FRESH_PROBE = lambda s, u: SENTENCES(s, u) and s.embeddings.sentences.fresh_baseline  # noqa: E731
INSPECTION = [
    _m("embeddings/probe/accuracy", "held-out accuracy of the logistic-regression probe on mean-pooled hidden "
       "states", "embeddings.sentences", SENTENCES),
    _m("embeddings/probe/majority", "held-out accuracy of always answering the training split's most frequent "
       "label (the baseline the probe must beat)", "embeddings.sentences", SENTENCES),
    _m("embeddings/probe/train_accuracy", "the probe's accuracy on the texts it was fitted on",
       "embeddings.sentences", SENTENCES),
    _m("embeddings/probe/train_texts", "texts the probe was fitted on", "embeddings.sentences", SENTENCES),
    _m("embeddings/probe/eval_texts", "held-out texts it was scored on", "embeddings.sentences", SENTENCES),
    _m("fresh/embeddings/probe/accuracy", "embeddings/probe/accuracy of a freshly initialised model of the same "
       "config and seed", "embeddings.sentences.fresh_baseline", FRESH_PROBE),
    _m("embeddings/analogies/solved", "share of analogies a - b + c = d whose nearest token (a, b, c excluded) is "
       "d", "embeddings.analogies", ANALOGIES),
    _m("embeddings/analogies/in_top_k", "share whose d is among the k nearest", "embeddings.analogies", ANALOGIES),
    _m("embeddings/analogies/count", "analogies asked", "embeddings.analogies", ANALOGIES),
    *[_m(f"embeddings/dimensions/{n}", d, "embeddings.dimensions", _section("embeddings", "dimensions")) for n, d in (
        ("random_abs_cos", "mean |cos| of random Gaussian vector pairs at the model's embedding dimension"),
        ("token_abs_cos", "mean |cos| of random pairs of the model's own token embeddings (specials excluded)"),
        ("sum_recovery", "at the model's dimension, share of the summed random vectors found again as the "
         "dictionary vectors with the largest dot products with the sum"))],
    _m("attention/prev_token/*", "previous-token score of one head (`l<layer>_h<head>`): mean attention weight "
       "from token i to token i - 1 over every token of the texts after the first", "attention",
       _section("attention")),
    _m("fresh/attention/prev_token/*", "the same head's score in a freshly initialised model of the same config "
       "and seed", "attention", _section("attention")),
    _m("attention/prev_token_max", "the highest previous-token score of any head", "attention",
       _section("attention")),
    _m("fresh/attention/prev_token_max", "the same in the freshly initialised model", "attention",
       _section("attention")),
    _m("attention/prev_token_uniform", "the score of a head that spreads its weight evenly over the tokens it can "
       "see (the chance level)", "attention", _section("attention"))]

SCALING_FIT = [("e", "E, the irreducible loss of L(N, D) = E + A/N^alpha + B/D^beta (nats/token)"),
               ("a", "A, the size term's coefficient"), ("b", "B, the data term's coefficient"),
               ("alpha", "alpha, the size exponent (N: non-embedding parameters)"),
               ("beta", "beta, the data exponent (D: training tokens)"),
               ("n_exponent", "beta/(alpha+beta): the compute-optimal N grows as C^this")]
SCALING_BUDGET = [("params", "compute-optimal N (non-embedding parameters)"), ("tokens", "compute-optimal D"),
                  ("loss", "the fitted loss of that N and D")]
BOOTSTRAP = lambda s, u: s.bootstrap.resamples > 0  # noqa: E731
HOLDOUT = lambda s, u: s.holdout == "largest"  # noqa: E731
BUDGET = lambda s, u: s.budget is not None  # noqa: E731

METRICS: dict[str, list[Metric]] = {
    "tokenize": [
        _m("data/vocab_size", "tokens in the trained vocabulary, special tokens included"),
        _m("train/documents", "documents in the training split"), _m("val/documents", "documents held out"),
        _m("train/tokens", "tokens written for training (an EOS after every document)"),
        _m("val/tokens", "tokens written to the held-out split"),
        _m("data/chars_per_token", "characters per training token (the compression)"), TIME],
    "pretrain": [
        _m("val/loss", "held-out loss per predicted token at the end (the curve's last point)"),
        _m("val/perplexity", "exp of val/loss: the perplexity `evaluate` measures on the same windows"),
        _m("before/val/loss", "val/loss of the model before training (untrained, or init_from)"),
        _m("before/val/perplexity", "exp of before/val/loss"),
        _m("train/loss", "training loss at the last logged step"), _m("train/steps", "optimizer steps taken"),
        _m("train/tokens", "training tokens seen, all processes"), _m("train/flops", "6 x parameters x tokens"),
        _m("params/total", "parameters of the model"),
        _m("params/non_embedding", "parameters outside the token embeddings (Kaplan et al.'s N)"),
        *PERF, _m("perf/compile_speedup", "trainer.compile auto: the eager step's time over the compiled step's, as "
                  "timed before keeping or undoing the compile", "compile auto tried a compile (a long enough run)",
                  lambda s, u: None if s.objective in ("causal", "masked") else False), TIME],
    "evaluate": [
        *_score("{split}", "tokens", lambda s, u: s.tokens is not None),
        *_score("texts", "texts", lambda s, u: bool(s.texts)),
        *_tasks("", "tasks", lambda s, u: s.tasks is not None), *REFERENCES, *JUDGE,
        _m("lm_eval/*/*", "every figure the lm-evaluation-harness reports, per task (`acc`, `acc_norm`, "
           "`word_perplexity`, ... and their `_stderr`)", "lm_eval", lambda s, u: s.lm_eval is not None),
        *INSPECTION, TIME],
    "finetune": [
        *PARAMS, _m("params/trainable_fraction", "params/trainable / params/total"), *_loop(), *PERF, PADDING,
        _m("perf/train_seconds", "training wall time, in seconds"),
        *_tasks("", "evaluation", HAS_EVAL), *_tasks("before/", "evaluation.base", HAS_BASE),
        *_tasks("gain/", "evaluation.base", HAS_BASE),
        _m("pretrain/perplexity", "perplexity on the tokens step's held-out split after tuning (an encoder-decoder: "
           "of its span-corruption targets)", "tokens", FORGET),
        _m("before/pretrain/perplexity", "the same before tuning", "tokens, evaluation.base", FORGET_BASE),
        _m("forgetting/perplexity_delta", "pretrain/perplexity - before/pretrain/perplexity (positive: it forgot)",
           "tokens, evaluation.base", FORGET_BASE),
        _m("forgetting/perplexity_ratio", "pretrain/perplexity / before/pretrain/perplexity",
           "tokens, evaluation.base", FORGET_BASE),
        _m("prune/sparsity", "share of exact zeros in the pruned weights", "peft.method prune",
           lambda s, u: s.peft.method == "prune"), *MIXTURE, TIME],
    "reward_model": [
        _m("val/accuracy", "held-out pairs whose chosen reply scores higher (ties count as wrong)"),
        _m("val/margin", "mean reward of chosen minus rejected, held out"),
        _m("val/loss", "Bradley-Terry loss on the held-out pairs"),
        _m("before/val/accuracy", "val/accuracy of the fresh head"), _m("before/val/margin", "its val/margin"),
        _m("before/val/loss", "its val/loss"), _m("reward/mean", "mean held-out reward"),
        _m("reward/std", "spread of the held-out rewards (ppo divides by it)"),
        _m("reward/reference_mean", "mean reward of the chosen replies (ppo subtracts it)"),
        _m("train/loss", "training loss at the last logged step"),
        _m("train/accuracy", "training pair accuracy at the last logged step", "pairs (not data.sheet.loss mse)",
           lambda s, u: not POINTWISE(s, u)), _m("train/steps", "optimizer steps"),
        *PARAMS, _m("data/train_pairs", "training pairs", "pairs (not data.sheet.loss mse)",
                    lambda s, u: not POINTWISE(s, u)),
        _m("data/train_ratings", "rated completions trained on pointwise", "data.sheet.loss mse", POINTWISE),
        _m("data/eval_pairs", "held-out pairs"),
        *[_m(f"data/{n}", d, "data.sheet", SHEET) for n, d in (
            ("sheet_rows", "labelled rows read from the filled sheets (every file)"),
            ("sheet_prompts", "prompts labelled in at least one file"),
            ("sheet_blank_prompts", "prompts of the key no file labels (skipped)"),
            ("ties", "pairs of one prompt and file with equal ranks, or ratings closer than min_gap: dropped, or with "
             "ties: soft trained on at p = 0.5 (held-out ties are always left out)"))], *MIXTURE, *PERF, TIME],
    "collect": [
        _m("collect/prompts", "prompts on the sheet"), _m("collect/completions", "completions on the sheet (its rows)"),
        _m("collect/duplicates", "completions left out as equal to an earlier one of their prompt (distinct)"),
        _m("collect/length", "mean completion length in tokens, EOS included"), TIME],
    "dpo": [
        _m("val/loss", "DPO loss on the held-out pairs after training"),
        _m("before/val/loss", "the same for the starting policy (ln 2 when it is the reference)"),
        _m("val/policy_prefers_chosen", "held-out pairs where the policy gives the chosen reply the higher log-prob"),
        _m("val/rewards/accuracy", "held-out pairs whose implicit reward beta*log(pi/pi_ref) ranks chosen higher"),
        _m("val/rewards/margin", "mean implicit-reward margin, chosen minus rejected"),
        _m("before/val/policy_prefers_chosen", "val/policy_prefers_chosen of the starting policy"),
        _m("before/val/rewards/accuracy", "0 by construction (policy = reference)"),
        _m("before/val/rewards/margin", "0 by construction"),
        _m("train/loss", "training loss at the last logged step"), _m("train/steps", "optimizer steps"),
        *PARAMS, _m("data/train_pairs", "training pairs"), _m("data/eval_pairs", "held-out pairs"), *MIXTURE, *PERF,
        TIME],
    "ppo": [
        *[_m(f"val/{n}", f"held-out prompts, final policy: {d}", w, t) for n, d, w, t in PPO_VAL],
        *[_m(f"before/val/{n}", "the same for the starting policy", w, t) for n, _, w, t in PPO_VAL],
        _m("reward/mean", "last iteration: mean reward of the rollouts"),
        _m("reward/model_score", "last iteration: mean reward-model score", "reward_model", RM),
        _m("reward/true_reward", "last iteration: mean true reward", "a true reward", TRUE),
        *[_m(f"ppo/{n}", "last iteration's PPO diagnostic (README, ppo)") for n in PPO_ITER],
        _m("perf/train_seconds", "training wall time, in seconds"), _m("train/steps", "optimizer steps"), TIME],
    "grpo": [
        *[_m(f"val/{n}", f"held-out prompts, final policy: {d}", w, t) for n, d, w, t in GRPO_VAL],
        *[_m(f"before/val/{n}", "the same for the starting policy", w, t) for n, _, w, t in GRPO_VAL],
        _m("reward/mean", "last iteration: mean summed reward (sum of weight x source) of the completions"),
        _m("reward/{source}", "last iteration: mean of one reward source, before its weight (rewards[].name, and "
           "`overlong` with overlong.soft_punishment)"),
        _m("reward/true_reward", "last iteration: mean true reward", "a true reward", TRUE),
        *[_m(f"grpo/{n}", f"last iteration: {d}") for n, d in GRPO_ITER],
        _m("grpo/skipped_groups", "groups dynamic sampling dropped, all iterations", "dynamic_sampling",
           lambda s, u: s.dynamic_sampling),
        _m("perf/train_seconds", "training wall time, in seconds"), _m("train/steps", "optimizer steps"), TIME],
    "constitutional": [
        *PARAMS, _m("params/trainable_fraction", "params/trainable / params/total"), *_loop(), *PERF, PADDING,
        _m("sl/prompts", "prompts answered and revised"), _m("sl/rounds", "critique/revision rounds"),
        _m("sl/sft_rows", "rows of the SFT half"), _m("sl/preference_rows", "rows of the preference half"),
        *[_m(f"labels/{n}", d, "feedback", lambda s, u: s.feedback is not None) for n, d in (
            ("mean_score", "mean probability of the preferred reply"), ("std_p", "spread of p(first reply)"),
            ("position_bias", "mean p_A - 0.5: how much the judge favours the first option"),
            ("pairs", "pairs labelled"))],
        *[_m(f"labels/{n}", d, "feedback, prompts with reference pairs", REFERENCE_PAIRS) for n, d in (("agreement", "share of reference pairs labelled as the reference says"),
                                         ("reference_p_mean", "mean p of the reference's better reply"),
                                         ("reference_pairs", "reference pairs labelled"))], TIME],
    "register": [_m("gate/passed", "1 when every gate condition held, else 0"),
                 _m("registry/version", "the registered version number"), TIME],
    "optimize": [
        _m("{variant}/size_mb", "size of the weight files on disk (int4's are bf16, quantized as they load)"),
        _m("{variant}/memory_mb", "size of the loaded model's parameters and buffers in memory (quantized data "
           "and scales)"),
        _m("{variant}/ms_per_token", "greedy generation latency per token (median)"),
        _m("{variant}/perplexity", "held-out perplexity (components/lib/scoring.py)", "measure.tokens",
           lambda s, u: s.measure.tokens is not None),
        _m("pruned/sparsity", "share of zeros in the pruned weights", "prune", lambda s, u: s.prune is not None),
        *[_m(f"{{derived}}/{n}", d, "prune or quantize") for n, d in (
            ("size_ratio", "size_mb over the baseline's"), ("memory_ratio", "memory_mb over the baseline's"),
            ("speedup", "baseline latency over this one"))],
        TIME],
    "monitor": [
        _m("schema/rows", "JSONL rows checked"), _m("schema/errors", "rows that break the expected fields"),
        _m("data/documents", "documents compared"), _m("data/tokens", "their tokens"),
        _m("drift/unknown_rate", "share of unknown (unmerged) tokens in the new data"),
        _m("drift/reference_unknown_rate", "the same in the reference"),
        _m("drift/js_divergence", "Jensen-Shannon divergence of the unigram distributions (base 2)"),
        _m("drift/perplexity", "the model's perplexity on the new data"),
        _m("drift/reference_perplexity", "its perplexity on the reference (or the version's own validation one)"),
        _m("drift/perplexity_ratio", "drift/perplexity / drift/reference_perplexity"),
        _m("drift/findings", "thresholds crossed"), TIME],
    "compare": [TIME],  # its table repeats the compared steps' own metrics, under their names
    "distill": [
        _m("val/loss", "held-out loss per predicted token of the distilled student (lib/scoring.py windows)"),
        _m("val/perplexity", "exp of val/loss"),
        _m("before/val/loss", "val/loss of the student before training"),
        _m("before/val/perplexity", "exp of before/val/loss"),
        _m("teacher/val/loss", "the teacher's held-out loss on the same windows"),
        _m("teacher/val/perplexity", "exp of teacher/val/loss"),
        _m("hard/val/loss", "held-out loss of the hard-label twin (same start, data and steps; no teacher)",
           "baseline", BASELINE),
        _m("hard/val/perplexity", "exp of hard/val/loss", "baseline", BASELINE),
        _m("hard/train/loss", "the twin's training cross-entropy at the last logged step", "baseline", BASELINE),
        _m("train/loss", "distillation loss at the last logged step: alpha T^2 divergence + (1 - alpha) CE"),
        _m("train/soft_loss", "its divergence per token, before the alpha T^2 weight"),
        _m("train/hard_loss", "its cross-entropy on the data, at the last data batch", "on_policy.lmbda < 1",
           DATA_BATCHES),
        _m("train/on_policy_fraction", "share of micro-batches whose continuation the student sampled", "on_policy",
           ON_POLICY),
        _m("train/steps", "optimizer steps (each student)"),
        _m("params/total", "parameters of the student"), _m("teacher/params/total", "parameters of the teacher"),
        _m("params/ratio", "params/total / teacher/params/total"),
        _m("perf/size_mb", "size of the student's weight files on disk"),
        _m("teacher/perf/size_mb", "the same for the teacher (saved the same way)"),
        _m("perf/size_ratio", "perf/size_mb / teacher/perf/size_mb"),
        _m("perf/ms_per_token", "the student's greedy generation latency per token (median)"),
        _m("teacher/perf/ms_per_token", "the same for the teacher"),
        _m("perf/latency_ratio", "perf/ms_per_token / teacher/perf/ms_per_token (below 1: the student is faster)"),
        _m("perf/tokens_per_s", "distillation training tokens per second (validation rounds excluded)"), TIME],
    "feedforward": [
        _m("val/loss", "held-out loss of the network kept: cross-entropy in nats (classification) or mean squared "
           "error (regression)"),
        _m("val/accuracy", "share of held-out examples whose most probable class is theirs", "classification",
           FF_CLASSIFIES),
        _m("val/mae", "mean absolute error on the held-out examples", "regression", FF_REGRESSES),
        _m("before/val/loss", "val/loss of the untrained network"),
        _m("before/val/accuracy", "val/accuracy of the untrained network", "classification", FF_CLASSIFIES),
        _m("before/val/mae", "val/mae of the untrained network", "regression", FF_REGRESSES),
        _m("val/best_loss", "lowest val/loss of any validation round (below val/loss: it overfitted later)"),
        _m("val/best_epoch", "epoch (fractional between epoch ends) of the best round of early_stopping.metric, "
           "or of val/loss without early stopping"),
        _m("train/loss", "mean training loss over the steps since the last validation round"),
        _m("train/accuracy", "share of training examples right over those steps", "classification", FF_CLASSIFIES),
        _m("train/mae", "mean absolute error over those steps", "regression", FF_REGRESSES),
        _m("train/steps", "gradient steps taken"), _m("train/samples", "training examples seen, repeats included"),
        _m("train/epochs", "passes over the training examples (train/samples / data/train_rows)"),
        _m("train/stopped_early", "1 when early stopping ended training before its budget, else 0",
           "early_stopping", lambda s, u: s.early_stopping is not None),
        _m("data/train_rows", "training examples (the coastline: samples streamed per pass)"),
        _m("data/val_rows", "held-out examples"),
        _m("data/dropped_rows", "rows left out for a missing value (penguins, csv; 0 for generated sets)"),
        _m("data/features", "inputs of the network"),
        _m("data/classes", "classes of the labels", "classification", FF_CLASSIFIES),
        _m("params/total", "weights and biases of the network"), TIME],
    "scaling": [
        *[_m(f"scaling/{k}", f"{d}, fitted on every run (approach 3, Huber on log-loss)") for k, d in SCALING_FIT],
        *[_m(f"scaling/{k}_{end}", f"{end} end of the bootstrap percentile interval of scaling/{k}", "bootstrap",
             BOOTSTRAP) for k, _ in SCALING_FIT for end in ("low", "high")],
        _m("scaling/objective", "the Huber sum at the fit (0: the law passes through every run)"),
        _m("scaling/exponents_at_bound", "exponents (alpha, beta) the fit left at their bound of 10: the runs do not "
           "identify them (0: both identified)"),
        _m("scaling/fit_error", "mean |fitted - measured| / measured loss over the runs fitted"),
        _m("scaling/runs", "runs fitted"),
        _m("scaling/holdout_error", "(predicted - measured) / measured val/loss of the largest-compute run, by the "
           "fit on the other runs", "holdout: largest", HOLDOUT),
        _m("scaling/holdout_predicted", "that run's loss as the fit without it predicts", "holdout: largest", HOLDOUT),
        _m("scaling/holdout_measured", "that run's measured val/loss", "holdout: largest", HOLDOUT),
        *[_m(f"scaling/budget_{k}", f"{d} at `budget` by the fitted law's closed form", "budget", BUDGET)
          for k, d in SCALING_BUDGET],
        *[_m(f"scaling/budget_{k}_{end}", f"{end} end of the bootstrap interval of scaling/budget_{k}",
             "budget, bootstrap", lambda s, u: BUDGET(s, u) and BOOTSTRAP(s, u))
          for k, _ in SCALING_BUDGET[:2] for end in ("low", "high")],
        _m("isoflop/budgets", "compute budgets whose loss-vs-log N parabola has its minimum inside the sizes trained"),
        *[_m(f"isoflop/{k}", d, "two budgets with a minimum", lambda s, u: None) for k, d in (
            ("n_exponent", "a of N*(C) = k C^a through the budgets' minima (approach 2)"),
            ("d_exponent", "b of D*(C) = k' C^b, D* = C / (6 N*)"))],
        *[_m(f"isoflop/budget_{k}", f"{d} at `budget` by approach 2's power law", "budget, two budgets with a "
             "minimum", lambda s, u: None if BUDGET(s, u) else False) for k, d in SCALING_BUDGET[:2]], TIME],
}


def placeholders(spec, up) -> dict[str, list[str]]:
    """Values of a kind's name placeholders under its settings ("*": known only from the data)."""
    kind = spec.kind
    if kind == "evaluate":
        names = [t.name for t in spec.tasks.items] + list((spec.tasks.tasks or BUILTIN_TASKS) if spec.tasks.builtin
                                                          else []) if spec.tasks is not None else []
        return {"split": [spec.split], "k": [str(spec.tasks.shots)] if spec.tasks else [], "task": names}
    if kind == "finetune":
        ev = spec.evaluation
        tasks = list(spec.data.tasks or BUILTIN_TASKS) if spec.data.builtin else ["*"]
        return {"k": [str(k) for k in dict.fromkeys((0, ev.shots))] if ev else [], "task": tasks,
                "source": spec.data.source_names()}
    if kind in ("dpo", "reward_model"):
        return {"source": spec.data.source_names()}
    if kind == "grpo":
        return {"source": spec.reward_names()}
    if kind == "optimize":
        derived = (["pruned"] if spec.prune else []) + list(spec.quantize)
        return {"variant": ["baseline"] + derived, "derived": derived}
    return {}


def emits(spec, up=lambda name: None, certain_only: bool = False) -> list[str]:
    """The metric names a step may report under its settings (`certain_only`: those it surely reports);
    `*` parts match any name."""
    values = placeholders(spec, up)
    out: list[str] = []
    for metric in METRICS[spec.kind]:
        reported = metric.test(spec, up)
        if reported is False or (certain_only and reported is None):
            continue
        keys = [k for k in values if "{" + k + "}" in metric.name]
        for combo in itertools.product(*(values[k] for k in keys)):
            name = metric.name.format(**dict(zip(keys, combo)))
            if name not in out:
                out.append(name)
    return out


def emitted(name: str, names: list[str]) -> bool:
    """Whether `name` is one of `names` (whose `*` parts match any one name segment)."""
    return any(fnmatch.fnmatchcase(name, pattern) and name.count("/") == pattern.count("/") for pattern in names)


def table(kind: str | None = None) -> str:
    """The README's metric table: every metric of every kind (or of one), when it is reported, what it measures."""
    rows = ["| kind | metric | reported when | what it measures |", "| --- | --- | --- | --- |"]
    for name, metrics in METRICS.items():
        if kind is not None and name != kind:
            continue
        for m in metrics:
            rows.append(f"| {name} | `{m.name}` | {m.when or 'always'} | {m.doc} |")
    return "\n".join(rows)
