"""`constitutional`: Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

Reads: a policy (`model:`), an optional `feedback_model:`, a constitution YAML (default: the shipped one,
checked with line-numbered errors before any model loads) and prompts (`{builtin: red_team}` or JSONL).
SL-CAI: each prompt is answered, then critiqued and revised for `rounds` rounds under principles drawn
uniformly at random, the context accumulating; the policy is fine-tuned on prompt -> final revision with
the library's SFT loop, `components.lib.sft.train_sft` (PEFT methods included). RL-CAI: for the other half of the prompts, two
replies (samples of the SL-CAI model, or a reference pair the row carries) are shown to the feedback
model under a random principle with the A/B order randomised; the soft label is p_A = softmax(l_A, l_B)[0].
Writes: `model/` (+ `adapter/`), and `data/`: `cai.jsonl` (every transcript, published column shape),
`sft.jsonl` (SFT half: {prompt, completion, messages}), `revision_preferences.jsonl` (preference half:
revision chosen over initial reply) and `preferences.jsonl` ({prompt, chosen, rejected, score} AI labels),
so `data: {step: NAME}` feeds finetune, reward_model and dpo.
Logs: a table of every round's samples, label statistics (mean, spread, position bias) and agreement with
reference pairs.
"""

from __future__ import annotations

import random

from components.constitutional import rl, sl
from components.lib import assets
from components.lib.io import read_jsonl, read_jsonl_files, write_jsonl
from components.lib.models import load_model
from components.lib import tasks as T_tasks
from components.constitutional import transcripts as T
from components.lib.context import StepContext, StepOutput, effort
from schemas.constitution import Constitution, Principle, load_constitution
from schemas.errors import did_you_mean
from schemas.steps.constitutional import ConstitutionalSpec



def load_principles(spec: ConstitutionalSpec, ctx: StepContext) -> tuple[Constitution, list[Principle]]:
    """The constitution (line-numbered errors) and the principles this step draws from."""
    constitution = load_constitution(ctx.resolve_path(spec.constitution) if spec.constitution
                                     else assets.path("constitution.yaml"))
    names = [p.name for p in constitution.principles]
    for name in spec.principles or []:
        if name not in names:
            raise ValueError(f"principles: '{name}' is not in the constitution{did_you_mean(name, names)}; "
                             f"it has: {', '.join(names)}")
    if spec.few_shot > len(constitution.examples):
        raise ValueError(f"few_shot: {spec.few_shot} transcripts asked for, the constitution has "
                         f"{len(constitution.examples)}")
    chosen = [p for p in constitution.principles if spec.principles is None or p.name in spec.principles]
    return constitution, chosen


def load_prompts(spec: ConstitutionalSpec, ctx: StepContext) -> list[dict]:
    """Prompt rows ({prompt} plus an optional reference {chosen, rejected}), seeded-shuffled, at most `limit`."""
    if spec.prompts.builtin == "red_team":
        found = read_jsonl(assets.path("red_team.jsonl"))
    elif spec.prompts.builtin == "polite":
        found = [{**row, "_where": f"builtin polite #{i}"} for i, row in enumerate(T_tasks.polite_requests(ctx.seed, 48))]
    else:
        found = read_jsonl_files(spec.prompts.files, ctx.resolve_path, "prompts.files")
    for row in found:
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"prompts: {row['_where']}: each row needs a non-empty 'prompt' string")
    rows = [{k: v for k, v in row.items() if k != "_where"} for row in found]
    random.Random(f"{ctx.seed}|prompts").shuffle(rows)
    rows = rows[:spec.prompts.limit] if spec.prompts.limit else rows
    if len(rows) < 2:
        raise ValueError(f"prompts: {len(rows)} prompt(s); the SFT and preference halves need at least 2")
    return rows


def preference_items(model, tokenizer, rows: list[dict], spec: ConstitutionalSpec, seed: int) -> list[dict]:
    """Two replies per prompt: a reference pair the row carries, or two samples of the SL-CAI model."""
    fb = spec.feedback
    use_ref = [fb.use_reference_pairs and "chosen" in r and "rejected" in r for r in rows]
    todo = [r["prompt"] for r, ref in zip(rows, use_ref) if not ref]
    sampled = []
    if todo:
        framed = [sl.policy_prompt(tokenizer, p) for p in todo]
        hot = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"temperature": fb.temperature})})
        sampled = list(zip(sl.sample(model, tokenizer, framed, hot, seed + 101),
                           sl.sample(model, tokenizer, framed, hot, seed + 202)))
    items, it = [], iter(sampled)
    for r, ref in zip(rows, use_ref):
        first, second = (r["chosen"], r["rejected"]) if ref else next(it)
        items.append({"prompt": r["prompt"], "first": first, "second": second, "reference": ref})
    return items


def run(spec: ConstitutionalSpec, ctx: StepContext) -> StepOutput:
    """SL-CAI transcripts and fine-tune, then RL-CAI labels; write model and data, log samples and statistics."""
    import lightning as L

    constitution, principles = load_principles(spec, ctx)  # fail fast, before any model loads
    prompts = load_prompts(spec, ctx)
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    source = ctx.model_source(spec.model)
    policy, tokenizer = load_model(source)

    transcripts = sl.critique_and_revise(policy, tokenizer, [r["prompt"] for r in prompts], spec, constitution,
                                         principles, ctx.seed)
    for t, r in zip(transcripts, prompts):
        t["reference"] = {k: r[k] for k in ("chosen", "rejected") if k in r}
    sft_half, pref_half = T.split_halves(transcripts, spec.sft_fraction, ctx.seed)
    data = ctx.out_dir / "data"
    for row in transcripts:
        row["split"] = "sft" if row in sft_half else "preferences"
    write_jsonl(data / "cai.jsonl", transcripts)
    write_jsonl(data / "sft.jsonl", [T.sft_row(r, sl.policy_prompt(tokenizer, r["prompt"])) for r in sft_half])
    write_jsonl(data / "revision_preferences.jsonl", [T.revision_pair(r) for r in pref_half])
    ctx.log_table([{"prompt": t["prompt"], "init_response": t["init_response"], **rd} for t in transcripts
                   for rd in t["rounds"]], "samples/sl_cai_rounds.json")
    del policy

    sl_out = sl.finetune_on_revisions(ctx, spec, source, [T.sft_row(r, sl.policy_prompt(tokenizer, r["prompt"]))
                                                          for r in sft_half])
    metrics = dict(sl_out.metrics)
    metrics.update({"sl/prompts": len(prompts), "sl/rounds": spec.rounds, "sl/sft_rows": len(sft_half),
                    "sl/preference_rows": len(pref_half)})
    if spec.feedback is not None:
        labelled = label_preference_half(spec, ctx, tokenizer, pref_half, principles)
        metrics.update(rl.label_stats(labelled))
        ctx.log_table(labelled, "samples/rl_cai_labels.json")
        write_jsonl(data / "preferences.jsonl", [
            {"prompt": sl.policy_prompt(tokenizer, r["prompt"]), "chosen": " " + r["chosen"],
             "rejected": " " + r["rejected"], "score": r["score"], "principle": r["principle"]} for r in labelled])
    else:
        write_jsonl(data / "preferences.jsonl", [
            {"prompt": sl.policy_prompt(tokenizer, r["prompt"]), "chosen": " " + r["revision_response"],
             "rejected": " " + r["init_response"], "score": 1.0} for r in pref_half])
    ctx.log_metrics(metrics)
    _report(ctx.name, metrics)
    outputs = {**sl_out.outputs, "data": "data"}
    return StepOutput(outputs=outputs, metrics=metrics,
                      info={"principles": [p.name for p in principles], "rounds": spec.rounds,
                            "effort": effort(examples=len(prompts), of="prompts", labels=len(pref_half))})


def label_preference_half(spec: ConstitutionalSpec, ctx: StepContext, tokenizer, pref_half: list[dict],
                          principles: list[Principle]) -> list[dict]:
    """RL-CAI: two replies per preference-half prompt from the SL-CAI model, labelled by the feedback model."""
    sl_model, _ = load_model(ctx.out_dir / "model")
    rows = [{"prompt": r["prompt"], **r["reference"]} for r in pref_half]
    items = preference_items(sl_model, tokenizer, rows, spec, ctx.seed)
    if spec.feedback_model is None:
        judge_model, judge_tok = sl_model, tokenizer
    else:
        source = ctx.model_source(spec.feedback_model)
        judge_model, judge_tok = load_model(source)
    return rl.label_pairs(judge_model, judge_tok, items, principles, spec.feedback, ctx.seed, spec.batch_size)


def _report(name: str, m: dict) -> None:
    line = f"{name}: {int(m['sl/prompts'])} prompts, {int(m['sl/rounds'])} round(s); SFT on {int(m['sl/sft_rows'])}"
    if "labels/pairs" in m:
        line += (f"; {int(m['labels/pairs'])} AI-labelled pairs, mean score {m['labels/mean_score']:.3f}, "
                 f"position bias {m['labels/position_bias']:+.3f}")
    if "labels/agreement" in m:
        line += f", agreement with reference {m['labels/agreement']:.1%}"
    print(line, flush=True)
