"""The `collect` step: a labelling sheet of a policy's completions, for people to rank or rate.

Reads a causal model and prompts (as ppo and grpo take them); samples k completions per prompt from the
policy's own distribution (components/lib/rollout.py `sample`); writes `sheet/` (sheet.csv, sheet.jsonl and
INSTRUCTIONS.txt, for the labeller) and `key/key.jsonl` (the mapping from anonymous ids to draws and exact
texts, kept aside). The format is components/lib/sheets.py's; a `reward_model` step reads the filled sheet
back with `data: {sheet: {files, key, mode}}`. Human feedback as rankings of k samples is InstructGPT's
(Ouyang et al. 2022); as absolute ratings, the course's other form.
"""

from __future__ import annotations

import random

import torch

from components.lib.context import StepContext, StepOutput
from components.lib.io import write_jsonl
from components.lib.models import evaluating
from components.lib.policy import SAMPLE_BATCH, load_policy, load_prompts
from components.lib.decoding import Decoder, step_decoder
from components.lib.rollout import encode_prompts, sample
from components.lib.sheets import KEY_FILE, make_sheet, write_sheet
from schemas.steps.collect import CollectSpec


def choose_prompts(spec: CollectSpec, ctx: StepContext, tokenizer) -> list[dict]:
    """Every file row (eval_files too), or the builtin training prompts; a seeded sample of max_prompts."""
    train, held = load_prompts(spec.prompts, 1, ctx, tokenizer)
    rows = train if spec.prompts.builtin else train + held
    if spec.max_prompts is not None and len(rows) > spec.max_prompts:
        rows = random.Random(f"{ctx.seed}|collect|prompts").sample(rows, spec.max_prompts)
    return rows


@torch.no_grad()
def sample_completions(policy, tokenizer, rows: list[dict], spec: CollectSpec, seed: int,
                       decoder: Decoder | None = None) -> tuple[list[list[str]], list[int]]:
    """`completions` sampled completions per row (text up to the first EOS), and each one's length in tokens."""
    k = spec.completions
    repeated = [r for r in rows for _ in range(k)]
    texts, lengths = [], []
    with evaluating(policy), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(repeated), SAMPLE_BATCH):
            query, mask = encode_prompts(tokenizer, repeated[i:i + SAMPLE_BATCH], spec.prompts.max_length,
                                         policy.device)
            roll = sample(policy, query, mask, spec.max_new_tokens, spec.temperature, tokenizer.eos_token_id,
                          tokenizer.pad_token_id, decoder=decoder)
            texts += tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
            lengths += roll.valid.sum(1).tolist()
    return [texts[i * k:(i + 1) * k] for i in range(len(rows))], lengths


def run(spec: CollectSpec, ctx: StepContext) -> StepOutput:
    """Load policy and prompts, sample, shuffle and anonymise, write sheet and key, log."""
    policy, tokenizer = load_policy(ctx.model_source(spec.policy))
    rows = choose_prompts(spec, ctx, tokenizer)
    completions, lengths = sample_completions(policy, tokenizer, rows, spec, ctx.seed, step_decoder(ctx))
    sheet, key, duplicates = make_sheet(rows, completions, spec.mode, ctx.seed, spec.distinct)
    if not sheet:
        raise ValueError(f"collect: every prompt's {spec.completions} completions were the same text, so there is "
                         "nothing to compare; raise temperature or completions, or set distinct: false")
    write_sheet(ctx.out_dir / "sheet", sheet, spec.mode)
    write_jsonl(ctx.out_dir / "key" / KEY_FILE, key)
    prompts = len({row["prompt_id"] for row in sheet})
    metrics = {"collect/prompts": prompts, "collect/completions": len(sheet), "collect/duplicates": duplicates,
               "collect/length": sum(lengths) / max(1, len(lengths))}
    if ctx.run_id is not None:
        ctx.log_artifact(ctx.out_dir / "sheet", "sheet")
        ctx.log_artifact(ctx.out_dir / "key", "key")
    print(f"{ctx.name}: {len(sheet)} completions of {prompts} prompts to {spec.mode} in "
          f"{ctx.out_dir / 'sheet'} (key kept apart in {ctx.out_dir / 'key'})", flush=True)
    return StepOutput(outputs={"sheet": "sheet", "key": "key"}, metrics=metrics,
                      info={"mode": spec.mode, "prompts": prompts})
