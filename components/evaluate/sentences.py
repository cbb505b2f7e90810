"""Sentence embeddings: mean-pooled hidden states of labelled texts, a linear probe on them, nearest texts.

- Pooling: the attention-mask-weighted mean of one layer's hidden states over a text's own tokens (Sentence-BERT's
  mean pooling, Reimers & Gurevych 2019). A causal model reads the text after the start token (components/lib/
  text.py), which is left out of the mean: it is the same vector for every text.
- Probe: multinomial logistic regression on the pooled vectors, standardized on the training split (a linear
  classifier probe, Alain & Bengio 2016), scored on held-out texts against always answering the training split's
  most frequent label.
- Neighbours: each query's k most cosine-similar texts of the set.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from components.lib import tasks
from components.lib.io import read_jsonl, split_rows
from components.lib.text import encode, pad_token, start_token
from schemas.steps.evaluate_inspection import SentencesSpec

PROBE_ITERATIONS = 200  # L-BFGS iterations: a convex problem of a few thousand weights converges well before


def load_texts(spec: SentencesSpec, seed: int, resolve: Callable[[str], Path]) -> tuple[list[dict], list[dict]]:
    """(train, held out) rows of {text, label}: the builtin reviews' two splits, or a file split by a seeded hash."""
    if spec.builtin == "reviews":
        return tasks.reviews(seed, "train", spec.n_per_split), tasks.reviews(seed, "eval", spec.n_per_split)
    path = resolve(spec.file)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings.sentences.file: {path} not found")
    rows = read_labelled(path, spec.text_column, spec.label_column)
    train, held = split_rows(rows, spec.eval_fraction, seed)
    if len({r["label"] for r in train}) < 2:
        raise ValueError(f"embeddings.sentences.file: {path}: the training split has fewer than two labels "
                         f"({len(train)} rows); a probe needs two or more")
    return train, held


def read_labelled(path: Path, text_column: str, label_column: str) -> list[dict]:
    """{text, label} rows of a CSV (header line) or JSONL file; a row without either column raises naming FILE:LINE."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            raw = [{**row, "_where": f"{path}:{reader.line_num}"} for row in reader]
            columns = reader.fieldnames or []
    else:
        raw = read_jsonl(path)
        columns = sorted({k for r in raw for k in r if k != "_where"})
    rows = []
    for row in raw:
        missing = [c for c in (text_column, label_column) if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"{row['_where']}: no {' or '.join(repr(c) for c in missing)} (embeddings.sentences."
                             f"text_column / label_column); the file's columns: {', '.join(columns) or 'none'}")
        rows.append({"text": str(row[text_column]), "label": str(row[label_column])})
    if len(rows) < 4:
        raise ValueError(f"embeddings.sentences.file: {path} has {len(rows)} rows; a probe needs at least 4")
    return rows


def text_ids(tokenizer, text: str, encoder_decoder: bool, limit: int) -> tuple[list[int], int]:
    """(ids, first) : the ids a model reads for `text` and the position of its first own token (the start token
    before it for a decoder or encoder-only model; the tokenizer's own specials for an encoder-decoder)."""
    if encoder_decoder:
        return tokenizer(text)["input_ids"][:limit], 0
    return ([start_token(tokenizer)] + encode(tokenizer, text))[:limit], 1


def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor, **kw):
    """The model's output with every hidden state (an encoder-decoder's encoder alone)."""
    if getattr(model.config, "is_encoder_decoder", False):
        out = model.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    else:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    return out


@torch.no_grad()
def pool(model, tokenizer, texts: list[str], layer: int, context: int, batch_size: int = 16) -> torch.Tensor:
    """(texts, hidden) mean of layer `layer`'s hidden states over each text's own tokens."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    vectors = []
    for i in range(0, len(texts), batch_size):
        encoded = [text_ids(tokenizer, t, encoder_decoder, context) for t in texts[i:i + batch_size]]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), pad_token(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (seq, _) in enumerate(encoded):  # right padding: real positions read only real ones
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        states = hidden_states(model, ids.to(device), mask.to(device)).hidden_states
        if not -len(states) <= layer < len(states):
            raise ValueError(f"embeddings.sentences.layer: {layer} is out of range; this model has {len(states)} "
                             f"hidden states (0 the embeddings .. {len(states) - 1}, or -1 the last)")
        weights = mask.clone().float()
        for row, (_, first) in enumerate(encoded):
            weights[row, :first] = 0  # the start token: the same for every text
        weights = weights.to(device)[..., None]
        hidden = states[layer].float()
        vectors.append(((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu())
    return torch.cat(vectors)


def fit_probe(x: torch.Tensor, labels: list[str], l2: float) -> tuple[Callable[[torch.Tensor], list[str]], float]:
    """A multinomial logistic regression fitted by L-BFGS: (predict, training accuracy).

    Written in torch rather than taken from scikit-learn, which is not a dependency of the project: the problem is
    one convex loss of (features + 1) x classes weights, which L-BFGS with a strong-Wolfe line search solves as
    scikit-learn's default `lbfgs` solver does."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = ((x - mean) / std).double()
    weight = torch.zeros(z.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

    @torch.no_grad()
    def predict(v: torch.Tensor) -> list[str]:
        logits = ((v - mean) / std).double() @ weight + bias
        return [classes[i] for i in logits.argmax(1).tolist()]

    return predict, accuracy(predict(x), labels)


def accuracy(predicted: list[str], labels: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, labels)) / max(1, len(labels))


def probe(train_x: torch.Tensor, train: list[dict], eval_x: torch.Tensor, held: list[dict], l2: float) -> dict:
    """The probe's held-out and training accuracy, and the majority baseline's held-out accuracy."""
    train_labels, eval_labels = [r["label"] for r in train], [r["label"] for r in held]
    predict, train_accuracy = fit_probe(train_x, train_labels, l2)
    majority = Counter(train_labels).most_common(1)[0][0]
    return {"accuracy": accuracy(predict(eval_x), eval_labels), "train_accuracy": train_accuracy,
            "majority": accuracy([majority] * len(eval_labels), eval_labels),
            "train_texts": len(train), "eval_texts": len(held)}


def neighbours(vectors: torch.Tensor, rows: list[dict], queries: torch.Tensor, query_texts: list[str],
               k: int) -> list[dict]:
    """For each query, its k most cosine-similar texts of `rows` (a query that is itself in the set is skipped)."""
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    sims = torch.nn.functional.normalize(queries, dim=-1) @ unit.T
    out = []
    for query, scores in zip(query_texts, sims):
        for i in range(len(rows)):
            if rows[i]["text"] == query:
                scores[i] = -2.0
        top = scores.topk(min(k, len(rows)))
        out += [{"query": query, "rank": rank, "text": rows[i]["text"], "label": rows[i]["label"],
                 "split": rows[i].get("split", ""), "cosine": round(float(s), 4)}
                for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
    return out
