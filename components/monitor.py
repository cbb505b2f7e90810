"""`monitor`: has the data moved away from what the model was trained on?

Reads: `model` (usually `models:/NAME@champion`, with its tokenizer), the new `data` and the `reference`
it was trained on. Checks (1) the JSONL schema: every expected field present with its JSON type, a
renamed or re-typed field named with its rows; (2) token drift: the unknown-token rate (`<unk>`, or a
lone non-ASCII byte for byte-level BPE, i.e. text the vocabulary never merged) and the Jensen-Shannon
divergence (Lin 1991) of the unigram token distributions; (3) the model's perplexity on the new data
against its perplexity on the reference. Writes `report.md`; logs every figure as a metric so drift is
plotted run after run; fails the step when a threshold is crossed (`on_drift: fail`).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np

from components.lib import scoring
from components.lib.context import StepContext, StepOutput
from components.lib.corpus import iter_documents, text_documents
from components.lib.io import expand, iter_jsonl
from components.lib.models import load_model
from components.lib.text import pad_token, start_token
from schemas.data import CorpusSpec
from schemas.steps.monitor import MonitorSpec

JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object",
              type(None): "null"}


def run(spec: MonitorSpec, ctx: StepContext) -> StepOutput:

    new_rows, new_texts = read_source(spec.data, ctx, spec.sample)
    ref_rows, ref_texts = read_source(spec.reference, ctx, spec.sample)
    expected = spec.fields or infer_fields(ref_rows) or {spec.data.text_field: "string"}
    schema = check_schema(new_rows, expected)
    if not new_texts:
        raise ValueError(f"data: no row has a string '{spec.data.text_field}' field, so there is no text to "
                         f"compare\n" + "\n".join(schema["problems"]))

    model, tokenizer = load_model(ctx.model_source(spec.model))
    new_docs, ref_docs = scoring.document_ids(tokenizer, new_texts), scoring.document_ids(tokenizer, ref_texts)
    new_ids, ref_ids = stream(new_docs), stream(ref_docs)
    unknown = unknown_ids(tokenizer)
    metrics = {"schema/rows": float(len(new_rows)), "schema/errors": float(schema["errors"]),
               "data/documents": float(len(new_texts)), "data/tokens": float(len(new_ids)),
               "drift/unknown_rate": float(np.isin(new_ids, unknown).mean()),
               "drift/reference_unknown_rate": float(np.isin(ref_ids, unknown).mean()),
               "drift/js_divergence": js_divergence(new_ids, ref_ids, len(tokenizer))}
    ppl_new = perplexity(model, tokenizer, new_docs, spec.context, spec.windows)
    ppl_ref = (tagged_perplexity(spec, ctx) if spec.validation_perplexity
               else perplexity(model, tokenizer, ref_docs, spec.context, spec.windows))
    metrics.update({"drift/perplexity": ppl_new, "drift/reference_perplexity": ppl_ref,
                    "drift/perplexity_ratio": ppl_new / ppl_ref})

    findings = over_thresholds(spec, metrics)
    metrics["drift/findings"] = float(len(findings))
    report = format_report(spec, ctx, metrics, findings, schema, top_shifts(new_ids, ref_ids, tokenizer))
    (ctx.out_dir / "report.md").write_text(report)
    print(report, flush=True)
    if findings and spec.on_drift == "fail":
        ctx.log_metrics(metrics)  # the engine logs metrics of finished steps only; drift must be plotted too
        ctx.log_artifact(ctx.out_dir / "report.md")
        raise RuntimeError(f"drift: {'; '.join(findings)} (full report in the step's MLflow run: report.md)")
    ctx.log_artifact(ctx.out_dir / "report.md")
    return StepOutput(outputs={"report": "report.md"}, metrics=metrics, info={"findings": findings})


# -- reading ---------------------------------------------------------------------------------------


def read_source(source: CorpusSpec, ctx: StepContext, limit: int) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """Raw JSONL rows (file, line, row) for the schema checks, and up to `limit` texts."""
    if source.files is None or not any(p.endswith(".jsonl") for p in source.files):
        return [], list(itertools.islice(iter_documents(source, ctx.resolve_path), limit))
    rows: list[tuple[str, int, dict]] = []
    texts: list[str] = []
    for path in expand(source.files, ctx.resolve_path, "files"):
        if path.suffix == ".jsonl":
            rows += [(path.name, n, row if isinstance(row, dict) else {"__invalid__": error or "not an object"})
                     for n, row, error in iter_jsonl(path)]
        else:
            texts += list(text_documents(path))
    rows = rows[:limit]
    texts += [r[source.text_field] for _, _, r in rows if isinstance(r.get(source.text_field), str)]
    return rows, texts[:limit]


# -- schema ----------------------------------------------------------------------------------------


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def infer_fields(rows: list[tuple[str, int, dict]]) -> dict[str, str]:
    """Each field's most common JSON type among the reference rows."""
    seen: dict[str, Counter] = {}
    for _, _, row in rows:
        for key, value in row.items():
            seen.setdefault(key, Counter())[json_type(value)] += 1
    return {key: types.most_common(1)[0][0] for key, types in seen.items() if key != "__invalid__"}


def check_schema(rows: list[tuple[str, int, dict]], expected: dict[str, str]) -> dict:
    """Missing, re-typed and new fields, by name, with the first rows where each happens."""
    missing: dict[str, list] = {}
    retyped: dict[str, list] = {}
    extra: Counter = Counter()
    bad_rows = set()
    for file, line, row in rows:
        for key, want in expected.items():
            if key not in row:
                missing.setdefault(key, []).append(f"{file}:{line}")
                bad_rows.add((file, line))
            elif json_type(row[key]) != want and not (want == "number" and json_type(row[key]) == "integer"):
                retyped.setdefault(key, []).append((f"{file}:{line}", json_type(row[key]), row[key]))
                bad_rows.add((file, line))
        extra.update(k for k in row if k not in expected)
    problems = []
    for key, where in missing.items():
        renamed = [k for k, n in extra.items() if n == len(where) and k != "__invalid__"]
        hint = f"; new field {', '.join(repr(k) for k in renamed)} in as many rows: renamed?" if renamed else ""
        problems.append(f"field '{key}' missing in {len(where)} of {len(rows)} rows (first: {where[0]}){hint}")
    for key, where in retyped.items():
        place, got, example = where[0]
        problems.append(f"field '{key}' should be {expected[key]} but is {got} in {len(where)} of {len(rows)} rows "
                        f"(first: {place}, value {json.dumps(example)[:60]})")
    if extra.get("__invalid__"):
        problems.append(f"{extra['__invalid__']} rows are not JSON objects")
    return {"errors": len(bad_rows), "problems": problems}


# -- tokens and the model --------------------------------------------------------------------------


def stream(docs: list[list[int]]) -> np.ndarray:
    """The documents' tokens as one stream (for token counts and distributions)."""
    return np.asarray([i for doc in docs for i in doc], dtype=np.int64)


def _byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the byte-level BPE alphabet) -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def unknown_ids(tokenizer) -> np.ndarray:
    """`<unk>`, plus for byte-level vocabularies the tokens that are one non-ASCII byte (an unmerged character)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.unk_token_id] if tokenizer.unk_token_id is not None else []
    if "Ġ" in vocab:  # byte-level BPE marks spaces with Ġ; its base alphabet is the 256 byte characters
        byte_of = _byte_chars()
        ids += [i for tok, i in vocab.items() if len(tok) == 1 and byte_of.get(tok, 0) >= 0x80]
    return np.asarray(ids, dtype=np.int64)


def js_divergence(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """Jensen-Shannon divergence of two unigram distributions, base 2 (0: same, 1: disjoint)."""
    from scipy.spatial.distance import jensenshannon

    p = np.bincount(a, minlength=vocab).astype(np.float64)
    q = np.bincount(b, minlength=vocab).astype(np.float64)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2)


def perplexity(model, tokenizer, docs: list[list[int]], context: int, windows: int) -> float:
    """Perplexity as `evaluate` measures it (components/lib/scoring.py), on `windows` of the documents' rolling
    windows spread evenly over them, so a long stream is sampled end to end rather than by its first documents."""
    chosen = scoring.spread(scoring.document_windows(docs, start_token(tokenizer), context), windows)
    return scoring.score_windows(model, chosen, 8, pad_token(tokenizer)).perplexity


def tagged_perplexity(spec: MonitorSpec, ctx: StepContext) -> float:
    """The registered version's own held-out perplexity, from its `metric.STEP.METRIC` tag (see `register`)."""
    from components.lib.registry import resolve_version

    if not spec.model.startswith("models:/"):
        raise ValueError(f"validation_perplexity reads a registered version's tags; model '{spec.model}' is not "
                         "models:/NAME@ALIAS (set validation_perplexity: null to measure on the reference)")
    tags = resolve_version(spec.model, ctx.tracking_uri).tags
    key = f"metric.{spec.validation_perplexity}"
    if key not in tags:
        have = sorted(k[len("metric."):] for k in tags if k.startswith("metric."))
        raise ValueError(f"validation_perplexity: {spec.model} has no tag {key}; its metric tags: "
                         f"{', '.join(have) or 'none'} (list the step in the register step's evidence)")
    return float(tags[key])


def top_shifts(new: np.ndarray, ref: np.ndarray, tokenizer, k: int = 8) -> list[tuple[str, float, float]]:
    """Tokens whose share grew the most: (token, reference share, new share)."""
    vocab = len(tokenizer)
    p = np.bincount(new, minlength=vocab) / max(1, len(new))
    q = np.bincount(ref, minlength=vocab) / max(1, len(ref))
    order = np.argsort(q - p)[:k]
    return [(tokenizer.convert_ids_to_tokens(int(i)), float(q[i]), float(p[i])) for i in order if p[i] > q[i]]


# -- verdict ---------------------------------------------------------------------------------------


def over_thresholds(spec: MonitorSpec, m: dict[str, float]) -> list[str]:
    t, found = spec.thresholds, []
    if t.schema_errors is not None and m["schema/errors"] > t.schema_errors:
        found.append(f"{m['schema/errors']:.0f} rows break the schema (limit {t.schema_errors})")
    if t.unknown_rate is not None and m["drift/unknown_rate"] > t.unknown_rate:
        found.append(f"unknown-token rate {m['drift/unknown_rate']:.2%} > {t.unknown_rate:.2%} "
                     f"(reference {m['drift/reference_unknown_rate']:.2%})")
    if t.js_divergence is not None and m["drift/js_divergence"] > t.js_divergence:
        found.append(f"Jensen-Shannon divergence {m['drift/js_divergence']:.3f} > {t.js_divergence:g}")
    if t.perplexity_ratio is not None and m["drift/perplexity_ratio"] > t.perplexity_ratio:
        found.append(f"perplexity {m['drift/perplexity']:.1f} is {m['drift/perplexity_ratio']:.2f}x the reference's "
                     f"{m['drift/reference_perplexity']:.1f} (limit {t.perplexity_ratio:g}x)")
    return found


def format_report(spec: MonitorSpec, ctx: StepContext, m: dict, findings: list[str], schema: dict,
                  shifts: list) -> str:
    lines = [f"# Drift report: {ctx.name} ({spec.model})", "",
             f"**{'DRIFT' if findings else 'OK'}**: " + ("; ".join(findings) if findings else "no threshold crossed"),
             "", "## Schema", *(f"- {p}" for p in schema["problems"] or ["every expected field present with its type"]),
             "", "## Figures", "| metric | value |", "|---|---|",
             *(f"| {k} | {v:.4g} |" for k, v in m.items()), "", "## Tokens that grew most (reference -> new share)",
             *(f"- `{tok}`: {q:.3%} -> {p:.3%}" for tok, q, p in shifts)]
    return "\n".join(lines) + "\n"
