"""`evaluate`: measure a causal or masked LM, or an encoder-decoder.

Reads: a model (a step's output, `./path`, `hf:ID` or `models:/name@alias`) with its tokenizer, and
optionally a tokenize step's token files. Writes: `metrics.json`, `generations.jsonl`, `tasks.jsonl`,
`references.jsonl`, `lm_eval.json`, `neighbours.jsonl`, `embeddings.png`, `analogies.jsonl`,
`sentence_neighbours.jsonl`, `projector/` (TensorBoard Embedding Projector files), `dimensions.png` and
`dimensions.json`, `attention/` (heatmaps per text, `prev_token.png`) and `attention_heads.jsonl`; logs the
metrics, the tables and the plots to the step's MLflow run. Metrics: perplexity and next-token top-1/top-5
accuracy (causal),
masked-token accuracy (masked, Devlin et al. 2019), span-corruption loss (encoder-decoders, Raffel et al. 2020:
components/lib/seq2seq.py), prompted tasks zero/few-shot (Brown et al. 2020),
decoding samples (greedy, sampling, top-k, nucleus: Holtzman et al. 2020, beam search), replies against
references (ROUGE, BLEU, chrF, exact match) and by a judge model (references.py), and the
lm-evaluation-harness's tasks (harness.py); inside the model (embeddings.py, sentences.py, dimensions.py,
attention.py): analogies, a linear probe on mean-pooled sentence vectors, random vectors against dimension, and
previous-token heads (Olsson et al. 2022), each against a freshly initialised twin where it says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.evaluate import attention, dimensions, embeddings, harness, references, sentences
from components.evaluate.decoding import sample_strategies
from components.lib import evaluation, models, scoring, seq2seq, span_corruption
from components.lib.context import StepContext, StepOutput, finite_metrics
from components.lib.decoding import step_decoder
from components.lib.io import read_jsonl, write_json_atomic, write_jsonl
from components.lib.text import pad_token, start_token
from components.lib.tokens import read_tokens
from schemas.steps.evaluate import EvaluateSpec, TasksSpec
from schemas.steps.evaluate_inspection import DimensionsSpec, SentencesSpec, parse_analogy

MAX_CONTEXT = 512  # scoring window when the model allows longer


def run(spec: EvaluateSpec, ctx: StepContext) -> StepOutput:
    """Load the model, score held-out tokens and texts, run tasks, decode, inspect embeddings."""
    torch.manual_seed(ctx.seed)
    model, tokenizer = models.load_model(ctx.model_source(spec.model), objective="auto")
    model.eval()
    if spec.attention is not None:
        attention.check_has_attention(model, spec.model)  # before anything else runs
    masked = models.is_masked_model(model.config)
    spans = models.is_seq2seq_model(model.config)  # scored on its own objective, T5's span corruption
    objective = "span_corruption" if spans else "masked" if masked else "causal"
    context = min(spec.context or MAX_CONTEXT, models.context_length(model))
    limit = spec.max_batches * spec.batch_size
    results: dict[str, float] = {}

    if spec.tokens is not None:
        folder = ctx.step(spec.tokens).path("tokens")
        if spans:
            scores = seq2seq.heldout_scores(model, tokenizer, folder, context, limit, spec.split, spec.batch_size,
                                            ctx.seed)
        elif masked:
            scores = scoring.score_masked(model, tokenizer, scoring.blocks(read_tokens(folder, spec.split), context,
                                                                           limit), spec.batch_size, seed=ctx.seed)
        else:
            windows = scoring.heldout_windows(folder, tokenizer, context, limit, spec.split)
            scores = scoring.score_windows(model, windows, spec.batch_size, pad_token(tokenizer))
        results.update({f"{spec.split}/{k}": v for k, v in scores.metrics(masked, objective).items()})
    if spec.texts:
        docs = scoring.document_ids(tokenizer, spec.texts)
        if spans:
            flat = [i for doc in docs for i in doc]
            scores = span_corruption.score_blocks(model, tokenizer, scoring.blocks(
                flat, span_corruption.tokens_length(context)), spec.batch_size, ctx.seed)
        elif masked:
            flat = [i for doc in docs for i in doc]
            scores = scoring.score_masked(model, tokenizer, scoring.blocks(flat, context), spec.batch_size,
                                          seed=ctx.seed)
        else:
            scores = scoring.score_documents(model, docs, start_token(tokenizer), pad_token(tokenizer), context,
                                             spec.batch_size)
        results.update({f"texts/{k}": v for k, v in scores.metrics(masked, objective).items()})
    causal_only = [k for k in ("tasks", "generation", "references", "lm_eval") if getattr(spec, k) is not None]
    if masked and causal_only:
        named = " and ".join([", ".join(causal_only[:-1]), causal_only[-1]] if len(causal_only) > 1 else causal_only)
        raise ValueError(f"{spec.model} is a masked LM: {named} need{'s' if len(causal_only) == 1 else ''} "
                         "a causal model")
    if spec.tasks is not None:
        task_metrics, rows = evaluation.score_tasks(model, tokenizer, load_tasks(spec.tasks, ctx), spec.tasks.shots,
                                                    spec.tasks.separator, decoder=step_decoder(ctx))
        results.update(task_metrics)
        _table(ctx, rows, "tasks")
    if spec.generation is not None:
        _table(ctx, sample_strategies(model, tokenizer, spec.generation, ctx.seed, step_decoder(ctx)), "generations")
    if spec.references is not None:
        results.update(_references(model, tokenizer, spec, ctx))
    if spec.lm_eval is not None:
        include = ctx.resolve_path(spec.lm_eval.include_path) if spec.lm_eval.include_path else None
        figures, _ = harness.evaluate(model, tokenizer, spec.lm_eval, include, ctx.out_dir, ctx.seed,
                                      models.context_length(model))
        results.update(figures)
        ctx.log_artifact(ctx.out_dir / "lm_eval.json")
    if spec.embeddings is not None:
        results.update(_embeddings(model, tokenizer, spec, ctx))
    if spec.attention is not None:
        results.update(_attention(ctx.model_source(spec.model), tokenizer, spec, ctx))

    results = finite_metrics(results)
    write_json_atomic(ctx.out_dir / "metrics.json", results)
    ctx.log_metrics(results)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k.count("/") < 3)
    print(f"{ctx.name}: {shown}", flush=True)
    return StepOutput(outputs={"metrics": "metrics.json"}, metrics=results,
                      info={"masked": masked, "objective": objective, "context": context})


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
    metrics, settings, table = references.score_replies(model, tokenizer, spec.references, rows, step_decoder(ctx))
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


def _embeddings(model, tokenizer, spec: EvaluateSpec, ctx: StepContext) -> dict[str, float]:
    e, out, results = spec.embeddings, Path(ctx.out_dir), {}
    if e.words:
        _table(ctx, embeddings.nearest_tokens(model, tokenizer, e.words, e.k), "neighbours")
    points, labels = embeddings.projection(model, tokenizer, e.plot_tokens)
    embeddings.plot_projection(points, labels, out / "embeddings.png",
                               f"{ctx.name}: token embeddings, first 2 principal components")
    ctx.log_artifact(out / "embeddings.png")
    if e.analogies:
        rows = embeddings.analogies(model, tokenizer, [parse_analogy(a) for a in e.analogies], e.k)
        _table(ctx, rows, "analogies")
        results.update({"embeddings/analogies/solved": sum(r["solved"] for r in rows) / len(rows),
                        "embeddings/analogies/in_top_k": sum(r["in_top_k"] for r in rows) / len(rows),
                        "embeddings/analogies/count": len(rows)})
    tables = []
    if e.projector is not None:
        weight = model.get_input_embeddings().weight.detach().float()
        ids, meta = embeddings.token_table(tokenizer, e.projector.tokens, weight.shape[0])
        tables.append(("tokens", weight[ids], ["token", "id"], meta))
    if e.sentences is not None:
        figures, vectors, rows = _sentences(model, tokenizer, e.sentences, ctx)
        results.update(figures)
        tables.append(("sentences", vectors, ["text", "label", "split"],
                       [[r["text"], r["label"], r["split"]] for r in rows]))
    if e.projector is not None:
        ctx.log_artifact(embeddings.write_projector(out / "projector", tables), "projector")
    if e.dimensions is not None:
        results.update(_dimensions(model, tokenizer, e.dimensions, ctx))
    return results


def _sentences(model, tokenizer, s: SentencesSpec, ctx: StepContext) -> tuple[dict, torch.Tensor, list[dict]]:
    """Pool the labelled texts, probe them (and a fresh twin's), list the queries' nearest texts."""
    train, held = sentences.load_texts(s, ctx.seed, ctx.resolve_path)
    rows = [{**r, "split": "train"} for r in train] + [{**r, "split": "eval"} for r in held]
    context = min(MAX_CONTEXT, models.context_length(model))

    def pooled(m, texts):
        return sentences.pool(m, tokenizer, texts, s.layer, context)

    x, n = pooled(model, [r["text"] for r in rows]), len(train)
    figures = {f"embeddings/probe/{k}": v for k, v in sentences.probe(x[:n], train, x[n:], held, s.l2).items()}
    if s.fresh_baseline:
        fx = pooled(attention.fresh_twin(model, ctx.seed), [r["text"] for r in rows])
        figures["fresh/embeddings/probe/accuracy"] = sentences.probe(fx[:n], train, fx[n:], held, s.l2)["accuracy"]
    if s.queries:
        _table(ctx, sentences.neighbours(x, rows, pooled(model, s.queries), s.queries, s.k), "sentence_neighbours")
    return figures, x, rows


def _dimensions(model, tokenizer, d: DimensionsSpec, ctx: StepContext) -> dict[str, float]:
    """Random vectors against dimension, the model's own dimension and token embeddings beside them."""
    weight = model.get_input_embeddings().weight.detach().float()
    special = set(tokenizer.all_special_ids)
    tokens = weight[[i for i in range(min(len(tokenizer), weight.shape[0])) if i not in special]]
    dim, generator = weight.shape[1], torch.Generator().manual_seed(ctx.seed)
    curves = dimensions.measure(d.dims, d.pairs, d.summed, d.dictionary, ctx.seed)
    figures = {"embeddings/dimensions/random_abs_cos": dimensions.random_abs_cos(dim, d.pairs, generator),
               "embeddings/dimensions/token_abs_cos": dimensions.token_abs_cos(tokens, d.pairs, generator),
               "embeddings/dimensions/sum_recovery": dimensions.sum_recovery(dim, d.summed, d.dictionary, generator)}
    path = Path(ctx.out_dir) / "dimensions.png"
    dimensions.plot(path, curves, dim, figures["embeddings/dimensions/token_abs_cos"], d.summed, d.dictionary,
                    f"{ctx.name}: vectors in high dimension")
    write_json_atomic(path.with_suffix(".json"), curves)
    ctx.log_artifact(path)
    ctx.log_artifact(path.with_suffix(".json"))
    return figures


def _attention(source: str, tokenizer, spec: EvaluateSpec, ctx: StepContext) -> dict[str, float]:
    """Heatmaps of the texts and every head's previous-token score, trained and freshly initialised."""
    a = spec.attention
    # eager attention is the only implementation that returns its weights (sdpa and flash compute them fused)
    model, _ = models.load_model(source, objective="auto", attn_implementation="eager")
    model.eval()
    fresh = attention.fresh_twin(model, ctx.seed, attn_implementation="eager")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    context = min(MAX_CONTEXT, models.context_length(model))
    ids = [sentences.text_ids(tokenizer, text, encoder_decoder, context)[0] for text in a.texts]
    maps = [attention.weights(model, seq) for seq in ids]
    scores = attention.previous_token_scores(maps)
    fresh_scores = attention.previous_token_scores([attention.weights(fresh, seq) for seq in ids])
    layers = attention.pick(a.layers, scores.shape[0], "attention.layers", "layers")
    heads = attention.pick(a.heads, scores.shape[1], "attention.heads", "heads per layer")
    causal = not (encoder_decoder or models.is_masked_model(model.config))
    uniform = attention.uniform_score([len(seq) for seq in ids], causal)
    folder = Path(ctx.out_dir) / "attention"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (text, layer_maps, seq) in enumerate(zip(a.texts, maps, ids)):
        shown = [tokenizer.decode([t]).replace("\n", "\\n") for t in seq[:a.max_tokens]]
        attention.plot_maps(layer_maps, shown, layers, heads, attention.previous_token_scores([layer_maps]),
                            folder / f"text_{i}.png", f"{ctx.name}: {text[:70]}")
    attention.plot_scores(scores, fresh_scores, uniform, folder / "prev_token.png", ctx.name)
    ctx.log_artifact(folder, "attention")
    _table(ctx, attention.head_rows(scores, fresh_scores), "attention_heads")
    figures = {f"{prefix}attention/prev_token/l{layer}_h{head}": float(grid[layer, head])
               for prefix, grid in (("", scores), ("fresh/", fresh_scores))
               for layer in range(grid.shape[0]) for head in range(grid.shape[1])}
    return {**figures, "attention/prev_token_max": float(scores.max()),
            "fresh/attention/prev_token_max": float(fresh_scores.max()), "attention/prev_token_uniform": uniform}
