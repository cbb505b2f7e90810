"""Every metric each step kind reports, by name: the source of the README's table, of the check that a gate
names a metric its step will emit, and of the test that each kind emits exactly these.

The names follow one scheme:
- `train/<m>`: measured on training data (curves during training; the last value at the end);
- `val/<m>`: measured on held-out data: curves during training, and the step's result at the end;
- `before/<m>`: the same held-out measurement `<m>` on the model the step started from, and `gain/<m>` =
  `<m>` - `before/<m>` where that difference is the point (task accuracy);
- `<split>/<m>`, `texts/<m>`, `tasks/<k>shot/<task>`: what `evaluate` measured;
- groups for facts and speed: `data/`, `params/`, `perf/`, `time/`; kinds' own groups: `ppo/`, `reward/`,
  `labels/`, `sl/`, `drift/`, `schema/`, `gate/`, `registry/`, `prune/`, `forgetting/`, and optimize's
  variants `baseline/`, `pruned/`, `int8/`.

A name may hold placeholders filled from the step's settings: `{split}`, `{k}` (shots), `{task}`,
`{variant}`; `*` stands for a part known only from the data (a task name in the rows of a JSONL file).
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


def _causal(spec, up) -> bool | None:
    """Whether the model an evaluate step reads is causal (None: from outside the pipeline, unknown)."""
    step = up(spec.model)
    if step is None:
        return None
    return step.kind != "pretrain" or step.objective == "causal"


def _score(prefix: str, when: str, test) -> list[Metric]:
    def kind_is(causal: bool):
        return lambda s, u: test(s, u) and (None if _causal(s, u) is None else _causal(s, u) == causal)

    causal, masked = kind_is(True), kind_is(False)
    return [
        _m(f"{prefix}/loss", "mean negative log-likelihood per predicted token (causal: every token of every "
           "document once, after BOS; masked: the masked tokens)", when, test),
        _m(f"{prefix}/perplexity", "exp of that loss (components/lib/scoring.py)", when, test),
        _m(f"{prefix}/tokens", "tokens predicted", when, test),
        _m(f"{prefix}/next_token_top1", "share of tokens the model ranks first (causal models)", when, causal),
        _m(f"{prefix}/next_token_top5", "share of tokens in the model's top 5 (causal models)", when, causal),
        _m(f"{prefix}/masked_accuracy", "share of masked tokens ranked first (masked models)", when, masked),
        _m(f"{prefix}/masked_top5", "share of masked tokens in the top 5 (masked models)", when, masked),
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
HAS_EVAL = lambda s, u: s.evaluation is not None  # noqa: E731
HAS_BASE = lambda s, u: s.evaluation is not None and s.evaluation.base  # noqa: E731
FORGET = lambda s, u: s.evaluation is not None and s.tokens is not None  # noqa: E731
FORGET_BASE = lambda s, u: FORGET(s, u) and s.evaluation.base  # noqa: E731
TRUE = lambda s, u: s.true_reward_function() is not None  # noqa: E731
# builtin prompts all carry a reference pair; in a file, the rows decide
REFERENCE_PAIRS = lambda s, u: s.feedback is not None and s.feedback.use_reference_pairs and \
    (True if s.prompts.builtin else None)  # noqa: E731
RM = lambda s, u: s.reward_model is not None  # noqa: E731

PPO_VAL = [("score", "mean reward the policy is trained on", "", ALWAYS),
           ("model_score", "mean reward-model score, centred and scaled", "reward_model", RM),
           ("true_reward", "mean true reward (measured only, never optimized)", "a true reward", TRUE),
           ("kl", "mean summed KL to the reference per reply", "", ALWAYS),
           ("length", "mean reply length in tokens", "", ALWAYS),
           ("true_reward_greedy", "true reward of greedy replies", "a true reward", TRUE),
           ("model_score_greedy", "reward-model score of greedy replies", "reward_model", RM)]
PPO_ITER = ["kl", "beta", "non_score_reward", "entropy", "clipfrac", "approx_kl", "ratio", "policy_loss",
            "value_loss", "value_clipfrac", "explained_variance", "response_length", "eos_fraction"]

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
        *PERF, TIME],
    "evaluate": [
        *_score("{split}", "tokens", lambda s, u: s.tokens is not None),
        *_score("texts", "texts", lambda s, u: bool(s.texts)),
        *_tasks("", "tasks", lambda s, u: s.tasks is not None), TIME],
    "finetune": [
        *PARAMS, _m("params/trainable_fraction", "params/trainable / params/total"), *_loop(), *PERF,
        _m("perf/train_seconds", "training wall time, in seconds"),
        *_tasks("", "evaluation", HAS_EVAL), *_tasks("before/", "evaluation.base", HAS_BASE),
        *_tasks("gain/", "evaluation.base", HAS_BASE),
        _m("pretrain/perplexity", "perplexity on the tokens step's held-out split after tuning", "tokens", FORGET),
        _m("before/pretrain/perplexity", "the same before tuning", "tokens, evaluation.base", FORGET_BASE),
        _m("forgetting/perplexity_delta", "pretrain/perplexity - before/pretrain/perplexity (positive: it forgot)",
           "tokens, evaluation.base", FORGET_BASE),
        _m("forgetting/perplexity_ratio", "pretrain/perplexity / before/pretrain/perplexity",
           "tokens, evaluation.base", FORGET_BASE),
        _m("prune/sparsity", "share of exact zeros in the pruned weights", "peft.method prune",
           lambda s, u: s.peft.method == "prune"), TIME],
    "reward_model": [
        _m("val/accuracy", "held-out pairs whose chosen reply scores higher (ties count as wrong)"),
        _m("val/margin", "mean reward of chosen minus rejected, held out"),
        _m("val/loss", "Bradley-Terry loss on the held-out pairs"),
        _m("before/val/accuracy", "val/accuracy of the fresh head"), _m("before/val/margin", "its val/margin"),
        _m("before/val/loss", "its val/loss"), _m("reward/mean", "mean held-out reward"),
        _m("reward/std", "spread of the held-out rewards (ppo divides by it)"),
        _m("reward/reference_mean", "mean reward of the chosen replies (ppo subtracts it)"),
        _m("train/loss", "training loss at the last logged step"),
        _m("train/accuracy", "training pair accuracy at the last logged step"), _m("train/steps", "optimizer steps"),
        *PARAMS, _m("data/train_pairs", "training pairs"), _m("data/eval_pairs", "held-out pairs"), *PERF, TIME],
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
        *PARAMS, _m("data/train_pairs", "training pairs"), _m("data/eval_pairs", "held-out pairs"), *PERF, TIME],
    "ppo": [
        *[_m(f"val/{n}", f"held-out prompts, final policy: {d}", w, t) for n, d, w, t in PPO_VAL],
        *[_m(f"before/val/{n}", "the same for the starting policy", w, t) for n, _, w, t in PPO_VAL],
        _m("reward/mean", "last iteration: mean reward of the rollouts"),
        _m("reward/model_score", "last iteration: mean reward-model score", "reward_model", RM),
        _m("reward/true_reward", "last iteration: mean true reward", "a true reward", TRUE),
        *[_m(f"ppo/{n}", "last iteration's PPO diagnostic (README, ppo)") for n in PPO_ITER],
        _m("perf/train_seconds", "training wall time, in seconds"), _m("train/steps", "optimizer steps"), TIME],
    "constitutional": [
        *PARAMS, _m("params/trainable_fraction", "params/trainable / params/total"), *_loop(), *PERF,
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
        _m("{variant}/size_mb", "size of the weight files on disk"),
        _m("{variant}/ms_per_token", "greedy generation latency per token (median)"),
        _m("{variant}/perplexity", "held-out perplexity (components/lib/scoring.py)", "measure.tokens",
           lambda s, u: s.measure.tokens is not None),
        _m("pruned/sparsity", "share of zeros in the pruned weights", "prune", lambda s, u: s.prune is not None),
        *[_m(f"{v}/{n}", d, w, t) for v, w, t in (("pruned", "prune", lambda s, u: s.prune is not None),
                                                   ("int8", "quantize int8", lambda s, u: s.quantize == "int8"))
          for n, d in (("size_ratio", "size over the baseline's"), ("speedup", "baseline latency over this one"))],
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
        return {"k": [str(k) for k in dict.fromkeys((0, ev.shots))] if ev else [], "task": tasks}
    if kind == "optimize":
        return {"variant": ["baseline"] + (["pruned"] if spec.prune else []) +
                           (["int8"] if spec.quantize == "int8" else [])}
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
