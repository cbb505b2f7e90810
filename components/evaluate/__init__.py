"""`evaluate`: measure a causal or masked LM.

Reads: a model (a step's output, `./path`, `hf:ID` or `models:/name@alias`) with its tokenizer, and
optionally a tokenize step's token files. Writes: `metrics.json`, `generations.jsonl`, `tasks.jsonl`,
`neighbours.jsonl`, `embeddings.png`; logs the metrics, the generation/task/neighbour tables and the
plot to the step's MLflow run. Metrics: perplexity and next-token top-1/top-5 accuracy (causal),
masked-token accuracy (masked, Devlin et al. 2019), prompted tasks zero/few-shot (Brown et al. 2020),
decoding samples (greedy, sampling, top-k, nucleus: Holtzman et al. 2020, beam search).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components import models
from components.context import StepContext, StepOutput, finite_metrics, write_json_atomic
from components.evaluate import embeddings, metrics as scoring
from components.evaluate.decoding import sample_strategies
from components.evaluate.prompted import run_tasks
from schemas.steps.evaluate import EvaluateSpec

MAX_CONTEXT = 512  # scoring block length when the model allows longer


def run(spec: EvaluateSpec, ctx: StepContext) -> StepOutput:
    """Load the model, score held-out tokens and texts, run tasks, decode, inspect embeddings."""
    torch.manual_seed(ctx.seed)
    source = ctx.model_source(spec.model)
    model, masked = models.load_lm(source)
    model.eval()
    tokenizer = models.load_tokenizer(source)
    context = min(spec.context or MAX_CONTEXT, models.context_length(model))
    results: dict[str, float] = {}

    if spec.tokens is not None:
        from components.data import read_tokens

        ids = read_tokens(ctx.step(spec.tokens).path("tokens"), spec.split)
        results.update(_score(model, tokenizer, masked, ids, context, spec, ctx, prefix=spec.split))
    if spec.texts:
        results.update(_score(model, tokenizer, masked, scoring.text_ids(tokenizer, spec.texts), context, spec, ctx,
                              prefix="texts"))
    if spec.tasks is not None:
        if masked:
            raise ValueError("tasks: prompted tasks need a causal model; this model is a masked LM")
        task_metrics, rows = run_tasks(model, tokenizer, spec.tasks, ctx)
        results.update(task_metrics)
        _table(ctx, rows, "tasks")
    if spec.generation is not None:
        if masked:
            raise ValueError("generation: decoding needs a causal model; this model is a masked LM")
        _table(ctx, sample_strategies(model, tokenizer, spec.generation, ctx.seed), "generations")
    if spec.embeddings is not None:
        _embeddings(model, tokenizer, spec, ctx)

    results = finite_metrics(results)
    write_json_atomic(ctx.out_dir / "metrics.json", results)
    ctx.log_metrics(results)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items() if not k.startswith("task/"))
    print(f"{ctx.name}: {shown}", flush=True)
    return StepOutput(outputs={"metrics": "metrics.json"}, metrics=results,
                      info={"masked": masked, "context": context})


def _score(model, tokenizer, masked: bool, ids, context: int, spec: EvaluateSpec, ctx: StepContext,
           prefix: str) -> dict[str, float]:
    blocks = scoring.token_blocks(ids, context, spec.max_batches * spec.batch_size)
    if blocks.shape[1] < 2:
        raise ValueError(f"evaluate: fewer than 2 tokens to score in '{prefix}'")
    if masked:
        out = scoring.score_masked(model, tokenizer, blocks, spec.batch_size, seed=ctx.seed)
    else:
        out = scoring.score_causal(model, blocks, spec.batch_size)
    return {f"{prefix}/{k}": v for k, v in out.items()}


def _table(ctx: StepContext, rows: list[dict], name: str) -> None:
    with open(ctx.out_dir / f"{name}.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    if rows:
        ctx.log_table(rows, f"{name}.json")


def _embeddings(model, tokenizer, spec: EvaluateSpec, ctx: StepContext) -> None:
    e = spec.embeddings
    if e.words:
        _table(ctx, embeddings.nearest_tokens(model, tokenizer, e.words, e.k), "neighbours")
    points, labels = embeddings.projection(model, tokenizer, e.plot_tokens)
    path = Path(ctx.out_dir) / "embeddings.png"
    embeddings.plot_projection(points, labels, path, f"{ctx.name}: token embeddings, first 2 principal components")
    ctx.log_artifact(path)
