"""Generated text against references: ROUGE, BLEU, chrF and exact match, by their reference implementations.

Nothing here re-implements a metric; each comes from the library the field reports it with, under that
library's defaults unless the spec says otherwise (ALGORITHMS.md §11 has the definitions and checks):
- **ROUGE-1/2/L/Lsum** (Lin 2004): `rouge_score.rouge_scorer.RougeScorer`; F-measure averaged over rows, as
  papers report it (named `rouge1`, `rouge2`, `rouge_l`, `rouge_lsum`). Its tokenizer lowercases and keeps `[a-z0-9]` runs; `use_stemmer` Porter-stems. With
  several references a row takes the best (`score_multi`).
- **BLEU** (Papineni et al. 2002) and **chrF** (Popović 2015): `sacrebleu`'s corpus scores (n-gram statistics
  summed over the corpus, not a mean of sentence scores; BLEU 13a-tokenized with exp smoothing by default),
  0-100 as sacrebleu reports them, with the signature that names every setting.
- **Exact match**: components/lib/evaluation.exact_match, the tasks' own definition (first line, trimmed,
  case-sensitive).
"""

from __future__ import annotations

import statistics

from components.lib.evaluation import exact_match

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_NAMES = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l", "rougeLsum": "rouge_lsum"}  # metric names


def reference_lists(references: list) -> list[list[str]]:
    """Each row's references as a list (a row may give one string or several)."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def score(predictions: list[str], references: list, metrics=("rouge", "bleu", "chrf", "exact_match"),
          use_stemmer: bool = False, bleu: dict | None = None, chrf: dict | None = None
          ) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """(corpus metrics, the settings each library used, per-row scores) of predictions against references.

    `bleu` and `chrf` are keyword arguments of sacrebleu's `BLEU` and `CHRF` (tokenize, smooth_method,
    lowercase; word_order).
    """
    refs = reference_lists(references)
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} references")
    rows: list[dict] = [{} for _ in predictions]
    out: dict[str, float] = {}
    settings: dict[str, str] = {}
    if not predictions:
        return out, settings, rows
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        for row, pred, targets in zip(rows, predictions, refs):
            scores = scorer.score_multi(targets, pred)  # best F over the references
            row.update({ROUGE_NAMES[kind]: scores[kind].fmeasure for kind in ROUGE_TYPES})
        out.update({name: statistics.fmean(r[name] for r in rows) for name in ROUGE_NAMES.values()})
        settings["rouge"] = f"rouge-score|types:{','.join(ROUGE_TYPES)}|stemmer:{use_stemmer}|f-measure|mean"
    # sacrebleu wants one stream per reference position; a row with fewer references repeats its first, which
    # changes neither BLEU's clipped counts and closest length nor chrF's best-reference choice.
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    if "bleu" in metrics:
        from sacrebleu.metrics import BLEU

        corpus = BLEU(**(bleu or {}))
        out["bleu"] = corpus.corpus_score(predictions, streams).score
        settings["bleu"] = corpus.get_signature().format()
        sentence = BLEU(**(bleu or {}), effective_order=True)
        for row, pred, targets in zip(rows, predictions, refs):
            row["bleu"] = sentence.sentence_score(pred, targets).score
    if "chrf" in metrics:
        from sacrebleu.metrics import CHRF

        corpus = CHRF(**(chrf or {}))
        out["chrf"] = corpus.corpus_score(predictions, streams).score
        settings["chrf"] = corpus.get_signature().format()
        for row, pred, targets in zip(rows, predictions, refs):
            row["chrf"] = corpus.sentence_score(pred, targets).score
    if "exact_match" in metrics:
        for row, pred, targets in zip(rows, predictions, refs):
            row["exact_match"] = float(any(exact_match(pred, t) for t in targets))
        out["exact_match"] = statistics.fmean(r["exact_match"] for r in rows)
    return out, settings, rows
