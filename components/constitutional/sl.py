"""SL-CAI: sample a reply, then rounds of critique and revision under random principles; fine-tune on
prompt -> final revision with the finetune step's machinery (PEFT methods included)."""

from __future__ import annotations

import random

from components.constitutional import transcripts as T
from components.lib.context import StepContext, StepOutput
from components.lib.generation import generate_texts
from components.lib.text import user_prompt
from schemas.constitution import Constitution, Principle
from schemas.steps.constitutional import ConstitutionalSpec


def policy_prompt(tokenizer, prompt: str) -> str:
    """How the policy is asked: one user turn (its chat template, else the Human/Assistant frame)."""
    return user_prompt(tokenizer, prompt)


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


def finetune_on_revisions(ctx: StepContext, spec: ConstitutionalSpec, model_source: str, sft_rows: list[dict]
                          ) -> StepOutput:
    """Fine-tune on prompt -> final revision (a seeded tenth, at least one row, held out for val/loss), with the
    library's SFT loop and this step's own loop and peft settings; a standalone model is always written."""
    import torch

    from components.lib.mlflow_models import log_outputs
    from components.lib.models import load_model
    from components.lib.peft import save_outputs
    from components.lib.sft import train_sft

    rows = list(sft_rows)
    random.Random(ctx.seed).shuffle(rows)
    k = max(1, len(rows) // 10)
    model, tokenizer = load_model(model_source, dtype=torch.float32)
    result = train_sft(ctx, model, tokenizer, rows[k:] or rows, rows[:k], spec.peft, spec.loop(), spec.max_length)
    outputs = save_outputs(result.model, tokenizer, ctx.out_dir, merge=True)
    log_outputs(ctx, outputs)
    return StepOutput(outputs=outputs, metrics=result.metrics)
