"""One perplexity: every token scored once, in lm-evaluation-harness's windows, with the same BOS convention.

Checked against lm-eval itself (its window function and its HFLM log-likelihoods on the same model), and
against the numbers pretrain's validation and evaluate report for the same model and tokens.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from components.lib import scoring
from components.lib.evaluation import continuation_logprob
from components.lib.models import load_model
from components.lib.text import pad_token, start_token


def test_the_windows_of_algorithms_md_check_10():
    tokens = [10, 11, 12, 13, 14]
    windows = scoring.rolling_windows(tokens, start=99, context=3)
    assert [(w.input_ids, w.targets) for w in windows] == [([99, 10, 11], [10, 11, 12]), ([11, 12, 13], [13, 14])]


@pytest.mark.parametrize("length, context", [(1, 4), (4, 4), (5, 4), (17, 4), (100, 7), (64, 64), (65, 64)])
def test_windows_are_lm_evals_and_predict_every_token_once(length, context):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = random.Random(length).choices(range(1000), k=length)
    ours = scoring.rolling_windows(tokens, start=7, context=context)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, context, 1)]
    assert [w.targets for w in ours] == [c for _, c in theirs]
    assert [w.input_ids for w in ours] == [(a + c)[:-1] for a, c in theirs]  # what HFLM feeds the model
    assert [t for w in ours for t in w.targets] == tokens
    assert all(len(w.input_ids) <= context for w in ours)


def test_documents_end_with_their_eos():
    assert list(scoring.documents([5, 6, 0, 7, 0, 8], eos=0)) == [[5, 6, 0], [7, 0], [8]]


def test_same_log_likelihoods_as_the_harness_on_our_model(tiny_lm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model(tiny_lm)
    texts = ["The if statement", "def f(x):\n    return x * 2\n" * 6, "A class is a blueprint."]
    docs = scoring.document_ids(tok, texts)
    ours = [scoring.score_documents(model, [d], start_token(tok), pad_token(tok), context=16).nll for d in docs]
    harness = HFLM(pretrained=str(tiny_lm), device="cpu", batch_size=2, max_length=16)
    rolling = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t + tok.eos_token,), i)
                                            for i, t in enumerate(texts)], disable_tqdm=True)
    assert [-x for x in rolling] == pytest.approx(ours, rel=1e-4)  # the document's EOS is one of its tokens
    pairs = [("The sky is", " blue"), ("", " The"), ("Answer:", " 12")]
    choice = harness.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                   disable_tqdm=True)
    assert [ll for ll, _ in choice] == pytest.approx([continuation_logprob(model, tok, c, x) for c, x in pairs],
                                                     rel=1e-4)


def test_perplexity_counts_every_scored_token(tiny_lm, tokenized):
    model, tok = load_model(tiny_lm)
    windows = scoring.heldout_windows(tokenized.path("tokens"), tok, context=32, limit=None)
    scores = scoring.score_windows(model, windows, batch_size=8, pad_id=pad_token(tok))
    from components.lib.tokens import read_tokens

    assert scores.count == len(read_tokens(tokenized.path("tokens"), "val"))  # every held-out token, once
    assert scores.perplexity == pytest.approx(math.exp(scores.nll / scores.count))
    by_hand = 0.0
    for w in windows[:3]:  # the first windows, one forward each, no batching or padding
        logits = model(input_ids=torch.tensor([w.input_ids])).logits[0, -len(w.targets):].float()
        by_hand += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w.targets), reduction="sum"))
    assert scoring.score_windows(model, windows[:3], 2, pad_token(tok)).nll == pytest.approx(by_hand, rel=1e-4)
