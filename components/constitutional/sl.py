"""SL-CAI: sample a reply, then rounds of critique and revision under random principles; fine-tune on
prompt -> final revision with the finetune step's machinery (PEFT methods included)."""

from __future__ import annotations

import random

from components.constitutional import transcripts as T
from components.context import StepContext, StepOutput
from components.generation import generate_texts
from schemas.constitution import Constitution, Principle
from schemas.steps.constitutional import ConstitutionalSpec


def policy_prompt(tokenizer, prompt: str) -> str:
    """How the policy is asked: its chat template when it has one, else the Human/Assistant frame."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return T.human_turn(prompt)


def sample(model, tokenizer, contexts: list[str], spec: ConstitutionalSpec, seed: int) -> list[str]:
    s = spec.sampling
    texts = generate_texts(model, tokenizer, contexts, strategy="top_p" if s.top_p < 1 else "sample",
                           max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed,
                           batch_size=spec.batch_size)
    return [T.clean(t) for t in texts]


def critique_and_revise(model, tokenizer, prompts: list[str], spec: ConstitutionalSpec, constitution: Constitution,
                        principles: list[Principle], seed: int) -> list[dict]:
    """SL-CAI transcripts for every prompt, in the published row shape; the context accumulates over rounds."""
    rng = random.Random(f"{seed}|principles")
    drawn = [T.draw_principles(rng, principles, spec.rounds) for _ in prompts]
    prefix = T.few_shot_prefix(constitution, spec.few_shot)
    init = sample(model, tokenizer, [policy_prompt(tokenizer, p) for p in prompts], spec, seed)
    contexts = [prefix + T.human_turn(p) + " " + r for p, r in zip(prompts, init)]
    rounds: list[list[dict]] = [[] for _ in prompts]
    for k in range(spec.rounds):
        asks = [T.critique_request(d[k]) for d in drawn]
        critiques = sample(model, tokenizer, [c + a for c, a in zip(contexts, asks)], spec, seed + 1 + 2 * k)
        contexts = [c + a + " " + cr for c, a, cr in zip(contexts, asks, critiques)]
        revise = [T.revision_request(d[k]) for d in drawn]
        revisions = sample(model, tokenizer, [c + r for c, r in zip(contexts, revise)], spec, seed + 2 + 2 * k)
        contexts = [c + r + " " + rv for c, r, rv in zip(contexts, revise, revisions)]
        for i, d in enumerate(drawn):
            rounds[i].append({"round": k + 1, "principle": d[k].name, "critic_prompt": d[k].critique,
                              "critic_response": critiques[i], "revision_prompt": d[k].revision,
                              "revision_response": revisions[i]})
    return [T.published_row(p, r, rs) for p, r, rs in zip(prompts, init, rounds)]


def finetune_spec(spec: ConstitutionalSpec):
    """The finetune step's spec carrying this step's training settings (data is given as rows)."""
    from schemas.steps.finetune import FinetuneSpec

    loop = {k: getattr(spec, k) for k in ("optimizer", "schedule", "grad_clip", "batch_size", "accumulate",
                                          "max_steps", "max_tokens", "val_every", "val_batches", "early_stopping",
                                          "checkpoint_every")}
    return FinetuneSpec(kind="finetune", model=spec.model, data={"builtin": "tasks", "max_length": spec.max_length},
                        peft=spec.peft, merge=True, evaluation=None, **loop)


def finetune_on_revisions(ctx: StepContext, spec: ConstitutionalSpec, model_source: str, sft_rows: list[dict],
                          ) -> StepOutput:
    """Fine-tune on prompt -> final revision; a seeded tenth (at least one row) is held out for val/loss."""
    from components.finetune import train_sft

    rows = list(sft_rows)
    random.Random(ctx.seed).shuffle(rows)
    k = max(1, len(rows) // 10)
    return train_sft(ctx, finetune_spec(spec), model_source, rows[k:] or rows, rows[:k])
