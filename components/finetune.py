"""`finetune`: supervised fine-tuning of a causal LM or an encoder-decoder (T5: the prompt to the encoder, the
completion from the decoder; components/lib/seq2seq.py), fully or parameter-efficiently, with a forgetting report.

Reads: a model (step, `hf:`, path or `models:/`), instruction data (JSONL in TRL's formats, the builtin
task mixture, or another step's `sft.jsonl`), and optionally a `tokenize` step's token files (replay and
the forgetting perplexity). Trains with the loss on completion tokens only (as TRL's SFTTrainer with
completion-only loss). Writes: `adapter/` (peft methods; `PeftModel.from_pretrained(base, path)`),
`model/` (merged standalone transformers folder with tokenizer), `metrics.json`, and logs the merged
model, the per-example predictions and the base-vs-tuned scores to MLflow.
Methods: LoRA (Hu et al. 2021), on a 4-bit base with `peft.quantize_base` (QLoRA, Dettmers et al. 2023;
CUDA only), prompt tuning (Lester et al. 2021), IA3 (Liu et al. 2022), BitFit (Ben Zaken et al. 2022),
magnitude pruning (Han et al. 2015); task mixtures against forgetting (FLAN, Wei et al. 2022).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from components.lib import datasources, evaluation, scoring, seq2seq
from components.lib.context import StepContext, StepOutput, effort
from components.lib.io import write_json_atomic
from components.lib.mlflow_models import log_outputs
from components.lib.models import context_length, load_model
from components.lib.peft import quantized_base_kwargs, save_outputs, sparsity_of
from components.lib.sft import load_rows, replay_blocks, train_sft
from components.lib.text import pad_token, prompt_completion
from components.lib.training import world_size
from schemas.steps.finetune import FinetuneSpec

PERPLEXITY_BATCH = 16  # windows per batch of the forgetting perplexity (`evaluation.perplexity_batches` of them)
SHOT_POOL = 2000  # training rows a streamed source lends as few-shot examples (the first drawn)


def run(spec: FinetuneSpec, ctx: StepContext) -> StepOutput:
    """Score the base model, fine-tune it on `spec.data`, save, score the result the same way."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    q = spec.peft.quantize_base  # QLoRA: checked first, as it fails on a machine without CUDA
    base_kwargs = quantized_base_kwargs(q, ctx.trainer.accelerator) if q else {"dtype": torch.float32}
    data = spec.data
    train_rows, eval_rows = load_rows(data, ctx.seed, ctx.resolve_path, lambda name: ctx.step(name).path("data"))
    if spec.replay and isinstance(train_rows, datasources.Draws):
        raise ValueError(f"replay adds pretraining blocks to the loaded training rows, and data is streamed (its files "
                         f"are over {datasources.STREAM_ABOVE_MB} MB; data.stream: auto): set data.stream: false, or "
                         "replay: 0")
    source = ctx.model_source(spec.model)
    model, tokenizer = load_model(source, **base_kwargs)
    token_dir = ctx.step(spec.tokens).path("tokens") if spec.tokens else None
    tasks = (evaluation.builtin_tasks(ctx.seed, data.eval_per_task, data.tasks) if data.builtin else
             evaluation.tasks_from_rows(as_text(eval_rows, tokenizer),
                                        as_text(datasources.sample(train_rows, SHOT_POOL), tokenizer),
                                        spec.evaluation.max_new_tokens)) if spec.evaluation is not None else []
    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    if spec.evaluation is not None and spec.evaluation.base:
        before, rows = measure(model, tokenizer, tasks, spec, token_dir, "before")
        metrics.update({f"before/{k}": v for k, v in before.items()})
        predictions += rows

    extra = []
    if spec.replay:
        count = round(len(train_rows) * spec.replay / (1 - spec.replay))
        extra = replay_blocks(token_dir, count, min(data.max_length, 128), ctx.seed)
    started = time.perf_counter()
    result = train_sft(ctx, model, tokenizer, train_rows, eval_rows, spec.peft, spec.loop(), data.max_length, extra,
                       packing=spec.packing_spec())
    metrics.update(result.metrics)
    metrics["perf/train_seconds"] = time.perf_counter() - started
    trained = datasources.trained_rows(train_rows, int(metrics["train/steps"]),
                                       spec.batch_size * spec.accumulate * world_size())
    if mixed := datasources.mixture_metrics(train_rows, trained):
        metrics.update(mixed)
        print(f"{ctx.name}: {datasources.describe_mixture(mixed, train_rows.sources)}", flush=True)
    if spec.peft.method == "prune":
        metrics["prune/sparsity"] = sparsity_of(result.model)
    outputs = save_outputs(result.model, tokenizer, ctx.out_dir, spec.merged)

    if spec.evaluation is not None:  # the model as saved: what `evaluate` on this step's output would load
        scored = load_model(ctx.out_dir / outputs["model"])[0] if "model" in outputs else result.model
        after, rows = measure(scored, tokenizer, tasks, spec, token_dir, "after")
        metrics.update(after)
        predictions += rows
        metrics.update(gains(metrics))
    write_json_atomic(ctx.out_dir / "metrics.json", metrics)
    outputs["metrics"] = "metrics.json"
    if predictions:
        ctx.log_table(predictions, "task_predictions.json")
    log_outputs(ctx, outputs)
    ctx.set_tags({"llmcycle.peft_method": spec.peft.method})
    return StepOutput(outputs=outputs, metrics=metrics,
                      info={"base_model": source, "peft_method": spec.peft.method,
                            "trainable_params": result.metrics["params/trainable"],
                            "total_params": result.metrics["params/total"],
                            "effort": effort(examples=trained + len(extra), of="examples")})


def as_text(rows: list[dict], tokenizer) -> list[dict]:
    """Rows with their `prompt` and `completion` as text (chat rows rendered), to score and to use as shots."""
    return [{**r, **dict(zip(("prompt", "completion"), prompt_completion(r, tokenizer)))} for r in rows]


def measure(model, tokenizer, tasks: list[evaluation.Task], spec: FinetuneSpec, token_dir, label: str
            ) -> tuple[dict[str, float], list[dict]]:
    """Task accuracy zero- and k-shot, and perplexity on the pretraining held-out tokens (the forgetting)."""
    ev = spec.evaluation
    reserve = spec.peft.num_virtual_tokens if spec.peft.method == "prompt_tuning" else 0
    started = time.perf_counter()
    metrics, predictions = {}, []
    for shots in dict.fromkeys((0, ev.shots)):
        scores, rows = evaluation.score_tasks(model, tokenizer, tasks, shots, reserve=reserve)
        metrics.update(scores)
        predictions += [{"model": label, **r} for r in rows]
    if token_dir is not None and seq2seq.is_seq2seq(model):  # on its own pretraining objective, span corruption
        metrics["pretrain/perplexity"] = seq2seq.heldout_scores(model, tokenizer, token_dir, min(context_length(model),
                                                                512), ev.perplexity_batches * PERPLEXITY_BATCH,
                                                                batch_size=PERPLEXITY_BATCH).perplexity
    elif token_dir is not None:
        windows = scoring.heldout_windows(token_dir, tokenizer, min(context_length(model), 512),
                                          ev.perplexity_batches * PERPLEXITY_BATCH)
        metrics["pretrain/perplexity"] = scoring.score_windows(model, windows, PERPLEXITY_BATCH,
                                                               pad_token(tokenizer)).perplexity
    shown = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items() if k.endswith("/accuracy"))
    print(f"{label}: task accuracy {shown} ({time.perf_counter() - started:.0f}s)", flush=True)
    return metrics, predictions


def gains(metrics: dict[str, float]) -> dict[str, float]:
    """After minus before: `gain/tasks/...`, and the forgetting `forgetting/perplexity_delta` (positive: forgot)
    and `forgetting/perplexity_ratio`."""
    out = {f"gain/{k}": v - metrics[f"before/{k}"] for k, v in metrics.items()
           if k.startswith("tasks/") and f"before/{k}" in metrics}
    before, after = metrics.get("before/pretrain/perplexity"), metrics.get("pretrain/perplexity")
    if before is not None and after is not None:
        out["forgetting/perplexity_delta"] = after - before
        out["forgetting/perplexity_ratio"] = after / before
    return out
