"""`evaluate`: measure a causal or masked LM.

Reads: a model (a step's output, `./path`, `hf:ID` or `models:/name@alias`) with its tokenizer, and
optionally a tokenize step's token files. Writes: `metrics.json`, `generations.jsonl`, `tasks.jsonl`,
`references.jsonl`, `lm_eval.json`, `neighbours.jsonl`, `embeddings.png`; logs the metrics, the tables and
the plot to the step's MLflow run. Metrics: perplexity and next-token top-1/top-5 accuracy (causal),
masked-token accuracy (masked, Devlin et al. 2019), prompted tasks zero/few-shot (Brown et al. 2020),
decoding samples (greedy, sampling, top-k, nucleus: Holtzman et al. 2020, beam search), replies against
references (ROUGE, BLEU, chrF, exact match) and by a judge model (references.py), and the
lm-evaluation-harness's tasks (harness.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.evaluate import embeddings, harness, references
from components.evaluate.decoding import sample_strategies
from components.lib import evaluation, models, scoring
from components.lib.context import StepContext, StepOutput, finite_metrics
from components.lib.io import read_jsonl, write_json_atomic, write_jsonl
from components.lib.text import pad_token, start_token
from components.lib.tokens import read_tokens
from schemas.steps.evaluate import EvaluateSpec, TasksSpec

MAX_CONTEXT = 512  # scoring window when the model allows longer


def run(spec: EvaluateSpec, ctx: StepContext) -> StepOutput:
    """Load the model, score held-out tokens and texts, run tasks, decode, inspect embeddings."""
    torch.manual_seed(ctx.seed)
    model, tokenizer = models.load_model(ctx.model_source(spec.model), objective="auto")
    model.eval()
    masked = models.is_masked_model(model.config)
    context = min(spec.context or MAX_CONTEXT, models.context_length(model))
    limit = spec.max_batches * spec.batch_size
    results: dict[str, float] = {}

    if spec.tokens is not None:
        folder = ctx.step(spec.tokens).path("tokens")
        if masked:
            scores = scoring.score_masked(model, tokenizer, scoring.blocks(read_tokens(folder, spec.split), context,
                                                                           limit), spec.batch_size, seed=ctx.seed)
        else:
            windows = scoring.heldout_windows(folder, tokenizer, context, limit, spec.split)
            scores = scoring.score_windows(model, windows, spec.batch_size, pad_token(tokenizer))
        results.update({f"{spec.split}/{k}": v for k, v in scores.metrics(masked).items()})
    if spec.texts:
        docs = scoring.document_ids(tokenizer, spec.texts)
        if masked:
            flat = [i for doc in docs for i in doc]
            scores = scoring.score_masked(model, tokenizer, scoring.blocks(flat, context), spec.batch_size,
                                          seed=ctx.seed)
        else:
            scores = scoring.score_documents(model, docs, start_token(tokenizer), pad_token(tokenizer), context,
                                             spec.batch_size)
        results.update({f"texts/{k}": v for k, v in scores.metrics(masked).items()})
    causal_only = [k for k in ("tasks", "generation", "references", "lm_eval") if getattr(spec, k) is not None]
    if masked and causal_only:
        named = " and ".join([", ".join(causal_only[:-1]), causal_only[-1]] if len(causal_only) > 1 else causal_only)
        raise ValueError(f"{spec.model} is a masked LM: {named} need{'s' if len(causal_only) == 1 else ''} "
                         "a causal model")
    if spec.tasks is not None:
        task_metrics, rows = evaluation.score_tasks(model, tokenizer, load_tasks(spec.tasks, ctx), spec.tasks.shots,
                                                    spec.tasks.separator)
        results.update(task_metrics)
        _table(ctx, rows, "tasks")
    if spec.generation is not None:
        _table(ctx, sample_strategies(model, tokenizer, spec.generation, ctx.seed), "generations")
    if spec.references is not None:
        results.update(_references(model, tokenizer, spec, ctx))
    if spec.lm_eval is not None:
        include = ctx.resolve_path(spec.lm_eval.include_path) if spec.lm_eval.include_path else None
        figures, _ = harness.evaluate(model, tokenizer, spec.lm_eval, include, ctx.out_dir, ctx.seed,
                                      models.context_length(model))
        results.update(figures)
        ctx.log_artifact(ctx.out_dir / "lm_eval.json")
    if spec.embeddings is not None:
        _embeddings(model, tokenizer, spec, ctx)

    results = finite_metrics(results)
    write_json_atomic(ctx.out_dir / "metrics.json", results)
    ctx.log_metrics(results)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k.count("/") < 3)
    print(f"{ctx.name}: {shown}", flush=True)
    return StepOutput(outputs={"metrics": "metrics.json"}, metrics=results,
                      info={"masked": masked, "context": context})


def load_tasks(spec: TasksSpec, ctx: StepContext) -> list[evaluation.Task]:
    """The tasks written in the spec or in JSONL files, then the builtin mixture's."""
    tasks = []
    for item in spec.items:
        if item.file is not None and not ctx.resolve_path(item.file).is_file():
            raise FileNotFoundError(f"tasks.items '{item.name}': file {ctx.resolve_path(item.file)} not found")
        rows = [e.model_dump() for e in item.examples] if item.examples is not None else \
            read_jsonl(ctx.resolve_path(item.file))
        for row in rows:
            missing = [k for k in ("prompt", "answer") if k not in row] + \
                (["choices"] if item.type == "choice" and "choices" not in row else [])
            if missing:
                raise ValueError(f"{row.get('_where', f'tasks.items {item.name!r}')}: row lacks {', '.join(missing)} "
                                 f"(task '{item.name}', type {item.type})")
            row.setdefault("completion", " " + str(row["answer"]).lstrip())
        tasks.append(evaluation.Task(item.name, item.type, rows, max_new_tokens=item.max_new_tokens))
    if spec.builtin == "tasks":
        tasks += evaluation.builtin_tasks(ctx.seed, spec.n_per_task, spec.tasks)
    return tasks


def _references(model, tokenizer, spec: EvaluateSpec, ctx: StepContext) -> dict[str, float]:
    """Replies against references, then (optionally) by the judge; the table `references.json`."""
    rows = references.load_rows(spec.references, ctx.seed, ctx.resolve_path)
    metrics, settings, table = references.score_replies(model, tokenizer, spec.references, rows)
    ctx.set_tags({f"references.{k}": v for k, v in settings.items()})
    if spec.judge is not None:
        # the judge reads text, so its own tokenizer encodes the questions (any judge works with any model)
        judge_model, judge_tokenizer = (model, tokenizer) if spec.judge.model == spec.model else \
            models.load_model(ctx.model_source(spec.judge.model), objective="causal")
        metrics.update(references.judge_replies(judge_model, judge_tokenizer, spec.judge, table))
        ctx.set_tags({"judge.model": spec.judge.model, "judge.mode": spec.judge.mode})
    _table(ctx, table, "references")
    return metrics


def _table(ctx: StepContext, rows: list[dict], name: str) -> None:
    write_jsonl(ctx.out_dir / f"{name}.jsonl", rows)
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
