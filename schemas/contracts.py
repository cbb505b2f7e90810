"""What can be known before anything trains, checked when a spec is validated.

- A reference names a step that writes what the field needs *with its settings* (a finetune with prompt
  tuning writes no merged model; a dpo with `peft: {method: full}` no adapter), and a causal model where
  one is needed.
- An `evaluate` step with nothing to measure scores the held-out tokens its model's chain was trained on
  (the tokenize step found through pretrain's `tokenizer`, finetune's `tokens` and the steps' models), or is
  an error when the chain has none.
- A register gate or `beat_champion` names a metric its step will emit with its settings
  (schemas/metrics.py). (monitor's `validation_perplexity` names a tag of a registered version, which
  another pipeline may have written, so it is checked when the tag is read.)
- A field that reads a tokenize step's held-out split names one that holds documents out.
- A distill step's teacher and student were trained on its tokenize step's tokenizer, where the pipeline shows it;
  the runs a scaling step fits were all trained on one tokenize step, and are pretrain steps (`Ref.kinds`).
- An `evaluate` step's `attention` reads a model that has attention (not an mlp, rnn or lstm), where the pipeline
  shows the model's family.
"""

from __future__ import annotations

from typing import Any

from .base import StepSpec, is_external
from .errors import Problem, did_you_mean
from .loader import Document
from .metrics import emits, emitted
from .steps.pretrain import SEQ2SEQ_FAMILIES

MODEL_FIELDS = ("model", "policy", "init_from")  # the fields through which a step's model descends from another


def fill_implied(spec: Any, doc: Document) -> list[Problem]:
    """Give an `evaluate` with nothing to measure the held-out tokens of its model's chain (or report it)."""
    problems = []
    for name, step in spec.steps.items():
        if step.kind != "evaluate" or any((step.tokens, step.texts, step.tasks, step.generation, step.embeddings,
                                           step.attention)):
            continue
        found = heldout_tokens(spec.steps, step.model)
        if found is None or spec.steps[found].val_fraction == 0:
            why = (f"its model '{step.model}' was not trained on a tokenize step of this pipeline, so there are no "
                   "held-out tokens to default to" if found is None else
                   f"the tokenize step '{found}' its model was trained on holds no documents out (val_fraction: 0)")
            problems.append(doc.problem(("steps", name), "evaluate has nothing to measure: give tokens, texts, tasks, "
                                        f"generation or embeddings ({why})"))
        else:
            step.tokens = found
    return problems


def heldout_tokens(steps: dict[str, StepSpec], ref: str, seen: frozenset = frozenset()) -> str | None:
    """The tokenize step whose held-out split the model of `ref` was trained on, if the pipeline knows it."""
    step = steps.get(ref) if isinstance(ref, str) and not is_external(ref) else None
    if step is None or ref in seen:
        return None
    if step.kind == "tokenize":
        return ref
    if step.kind in ("pretrain", "distill"):
        return step.tokenizer
    if getattr(step, "tokens", None):
        return step.tokens
    return next((found for f in MODEL_FIELDS if (found := heldout_tokens(steps, getattr(step, f, None), seen | {ref}))),
                None)


def causal(steps: dict[str, StepSpec], ref: str) -> bool | None:
    """Whether the model `ref` names is causal (None: from outside the pipeline, unknown)."""
    step = steps.get(ref)
    if step is None:
        return None
    if step.kind == "pretrain":
        return step.objective == "causal"
    return step.kind != "reward_model"


def output_problem(doc: Document, where: tuple, target: str, steps: dict, ref, heldout: bool = False) -> Problem | None:
    """The problem with a reference to `target` for output `ref.output`, or None when it is fine (`heldout`: the
    field reads the held-out split, which a tokenize step with `val_fraction: 0` does not write)."""
    step = steps[target]
    if heldout and step.kind == "tokenize" and step.val_fraction == 0:
        return doc.problem(where, f"this reads the held-out split of step '{target}', which holds no documents out "
                           "(val_fraction: 0); give it a val_fraction above 0")
    if ref.kinds and step.kind not in ref.kinds:
        able = [n for n, s in steps.items() if s is not None and s.kind in ref.kinds]
        return doc.problem(where, f"step '{target}' is a {step.kind} step; this field takes {' or '.join(ref.kinds)} "
                           "steps" + (f" ({', '.join(able)} in this pipeline)" if able else ""))
    if ref.output != "*" and ref.output not in step.outputs():
        why = step.why_no(ref.output)
        able = [n for n, s in steps.items() if s is not None and ref.output in s.outputs()]
        return doc.problem(where, f"step '{target}' ({step.kind}) writes no {ref.output}"
                           + (f": {why}" if why else "") + f"; it writes {', '.join(sorted(step.outputs())) or 'nothing'}"
                           + (f"; steps that write one: {', '.join(able)}" if able else ""))
    seq2seq = ref.causal and model_family(steps, target) in SEQ2SEQ_FAMILIES
    if seq2seq and not ref.seq2seq:
        return doc.problem(where, f"step '{target}' ({step.kind}) makes an encoder-decoder (t5); this field needs a "
                           "causal LM")
    if ref.causal and not seq2seq and causal(steps, target) is False:
        return doc.problem(where, f"step '{target}' ({step.kind}) makes a masked LM; this field needs a causal LM")
    return None


def model_family(steps: dict[str, StepSpec], ref: str, seen: frozenset = frozenset()) -> str | None:
    """The `model.family` the model of `ref` was built with (through the steps it descends from), if known."""
    step = steps.get(ref) if isinstance(ref, str) and not is_external(ref) else None
    if step is None or ref in seen:
        return None
    built = {"pretrain": "model", "distill": "student"}.get(step.kind)
    if built and hasattr(getattr(step, built), "family"):
        return getattr(step, built).family
    return next((found for f in (*MODEL_FIELDS, "student") if (found := model_family(steps, getattr(step, f, None),
                                                                                        seen | {ref}))), None)


def attention_problems(spec: Any, doc: Document) -> list[Problem]:
    """An evaluate step's attention section reads a transformer (mlp, rnn and lstm have no attention)."""
    problems = []
    for name, step in spec.steps.items():
        family = model_family(spec.steps, step.model) if step.kind == "evaluate" and step.attention else None
        if family in ("mlp", "rnn", "lstm"):
            problems.append(doc.problem(("steps", name, "attention"), f"model '{step.model}' is an {family} (model."
                                        "family of the step it comes from), which has no attention; attention maps "
                                        "need a transformer (llama, gpt2, bert, roberta): remove attention or "
                                        "evaluate a transformer"))
    return problems


def tokenizer_problems(spec: Any, doc: Document) -> list[Problem]:
    """Models a step compares token id by token id (distill's teacher and student) share its tokenizer, and so do
    the runs a `scaling` step fits (a loss per token compares only under one tokenizer)."""
    return [doc.problem(("steps", name) + path, message) for name, step in spec.steps.items()
            if step.kind in ("distill", "scaling") for path, message in step.tokenizer_problems(spec.steps)]


def gate_problems(spec: Any, doc: Document) -> list[Problem]:
    """Every gate and metric reference names a metric its step will emit."""
    up = spec.steps.get
    problems = []
    for name, step in spec.steps.items():
        for where, operand in metric_operands(step):
            target = spec.steps.get(operand.step)
            if target is None:
                continue  # reported as an unknown step
            names = emits(target, up)
            if not emitted(operand.metric, names):
                shown = ", ".join(names)
                problems.append(doc.problem(("steps", name) + where, f"step '{operand.step}' ({target.kind}) does not "
                                            f"emit '{operand.metric}' with its settings"
                                            f"{did_you_mean(operand.metric, names)}; it emits: {shown}"))
    return problems


def metric_operands(step: StepSpec):
    """(field path, Operand) for every STEP.METRIC a step reads."""
    from .steps.register import parse_operand

    if step.kind == "register":
        for i, condition in enumerate(step.conditions()):
            for operand in (condition.left, condition.right):
                if operand.step is not None:
                    yield ("gate", i), operand
        if step.beat_champion is not None:
            yield ("beat_champion", "metric"), parse_operand(step.beat_champion.metric)
