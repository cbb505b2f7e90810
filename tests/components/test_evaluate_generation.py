"""evaluate: replies against references (rouge-score, sacrebleu), the judge, and the lm-evaluation-harness."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import check_contract, make_ctx
from components.lib import reference_metrics
from schemas.steps.evaluate import EvaluateSpec


def evaluate(tmp_path, upstream=None, **kw):
    from components import evaluate as component

    spec = EvaluateSpec(kind="evaluate", **kw)
    ctx = make_ctx(tmp_path, name="eval", kind="evaluate", upstream=upstream or {})
    out = component.run(spec, ctx)
    check_contract(spec, out)
    return ctx, out


# -- the libraries' figures, as ALGORITHMS.md §11 computed them by hand ---------------------------------------


def test_rouge_matches_the_hand_computed_checks():
    m, settings, _ = reference_metrics.score(["The cat is on the mat."], ["The cat sat on the mat."], ["rouge"])
    assert (m["rouge1"], m["rouge2"], m["rouge_l"], m["rouge_lsum"]) == pytest.approx((5 / 6, 0.6, 5 / 6, 5 / 6))
    assert "stemmer:False" in settings["rouge"]
    plain, _, _ = reference_metrics.score(["the dog runs fast"], ["the dogs are running fast"], ["rouge"])
    stemmed, settings, _ = reference_metrics.score(["the dog runs fast"], ["the dogs are running fast"], ["rouge"],
                                                   use_stemmer=True)
    assert plain["rouge1"] == pytest.approx(0.444444, abs=1e-6)
    assert (stemmed["rouge1"], stemmed["rouge2"]) == pytest.approx((0.888889, 0.571429), abs=1e-6)
    assert "stemmer:True" in settings["rouge"]
    m, _, _ = reference_metrics.score(["the dog ran.\nthe cat sat."], ["the cat sat.\nthe dog ran."], ["rouge"])
    assert (m["rouge1"], m["rouge2"], m["rouge_l"], m["rouge_lsum"]) == pytest.approx((1.0, 0.8, 0.5, 1.0))


def test_bleu_and_chrf_match_the_hand_computed_checks():
    m, settings, rows = reference_metrics.score(["The cat sat on the mat."], ["The cat is on the mat."],
                                                ["bleu", "chrf"])
    assert m["bleu"] == pytest.approx(48.892302, abs=1e-5) == rows[0]["bleu"]
    assert m["chrf"] == pytest.approx(67.172735, abs=1e-5)
    assert settings["bleu"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    assert reference_metrics.score(["a b c d"], ["a b x d"], ["bleu"])[0]["bleu"] == pytest.approx(35.355339, abs=1e-5)
    none = reference_metrics.score(["a b c d"], ["a b x d"], ["bleu"], bleu={"smooth_method": "none"})[0]
    assert none["bleu"] == 0.0
    m, _, rows = reference_metrics.score(["the cat"], ["the cat sat"], ["bleu"])
    assert (m["bleu"], rows[0]["bleu"]) == pytest.approx((0.0, 60.653066), abs=1e-5)  # corpus vs sentence
    m, _, rows = reference_metrics.score(["The cat sat on the mat.", "A dog."], ["The cat is on the mat.", "A dog barked."],
                                         ["bleu"])
    assert m["bleu"] == pytest.approx(42.102305, abs=1e-5)  # statistics summed over the corpus ...
    assert sum(r["bleu"] for r in rows) / 2 == pytest.approx(47.015473, abs=1e-5)  # ... not a mean of sentences
    assert reference_metrics.score(["abc"], ["abd"], ["chrf"])[0]["chrf"] == pytest.approx(38.888889, abs=1e-5)
    plus = reference_metrics.score(["The cat sat on the mat."], ["The cat is on the mat."], ["chrf"],
                                   chrf={"word_order": 2})[0]
    assert plus["chrf"] == pytest.approx(69.436953, abs=1e-5)


def test_several_references_take_the_best_and_exact_match_is_the_tasks_definition():
    m, _, rows = reference_metrics.score(["red cat", "Blue Dog"], [["green cat", "red cat"], "blue dog"])
    assert rows[0]["rouge1"] == 1.0 and rows[0]["exact_match"] == 1.0
    assert rows[1]["rouge1"] == 1.0 and rows[1]["exact_match"] == 0.0  # rouge lowercases, exact match does not
    assert m["exact_match"] == 0.5


# -- the step ----------------------------------------------------------------------------------------------


def test_references_are_scored_from_the_generated_replies(tmp_path, tiny_lm):
    from sacrebleu.metrics import BLEU

    refs = {"builtin": "tasks", "n_per_task": 4, "max_new_tokens": 8}
    ctx, out = evaluate(tmp_path, model=str(tiny_lm), references=refs)
    m = out.metrics
    table = [json.loads(line) for line in (ctx.out_dir / "references.jsonl").read_text().splitlines()]
    assert m["references/rows"] == len(table) == 12 and {r["task"] for r in table} == {"copy", "reverse",
                                                                                        "capitalize"}
    assert m["references/bleu"] == pytest.approx(BLEU().corpus_score([r["reply"] for r in table],
                                                                      [[r["reference"] for r in table]]).score)
    assert m["references/rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in table) / 12)
    assert all("\n" not in r["reply"] for r in table)  # `stop: line`
    assert 0 <= m["references/exact_match"] <= 1 and 0 <= m["references/chrf"] <= 100


def test_a_references_file_and_its_row_errors(tmp_path, tiny_lm):
    from schemas.rows import data_problems

    good = tmp_path / "refs.jsonl"
    good.write_text(json.dumps({"prompt": "Copy: a b\nAnswer:", "reference": ["a b", "a  b"]}) + "\n"
                    + json.dumps({"prompt": "Copy: c\nAnswer:", "reference": "c"}) + "\n")
    spec = EvaluateSpec(kind="evaluate", model=str(tiny_lm), references={"files": [str(good)], "metrics": ["rouge"]})
    assert data_problems(spec, lambda p: tmp_path / p) == []
    _, out = evaluate(tmp_path, model=str(tiny_lm), references={"files": [str(good)], "metrics": ["rouge"]})
    assert out.metrics["references/rows"] == 2 and "references/bleu" not in out.metrics
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    spec = EvaluateSpec(kind="evaluate", model=str(tiny_lm), references={"files": [str(bad)]})
    assert data_problems(spec, lambda p: tmp_path / p) == [f"{bad}:1: reference: Field required"]


class FirstPositionJudge(torch.nn.Module):
    """A judge that always leans to option A by `bias` nats, whatever it reads: pure position bias."""

    def __init__(self, tokenizer, bias: float):
        from components.lib.judging import option_ids

        super().__init__()
        self.vocab, self.bias, self.w = len(tokenizer), bias, torch.nn.Parameter(torch.zeros(1))
        self.a, self.b = option_ids(tokenizer, ("A", "B"))  # one token each in the 512-token vocabulary

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[:, :, self.a[0]] = self.bias
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_swapping_positions_cancels_a_judges_position_bias_and_reports_it(tiny_lm, mode):
    from components.evaluate.references import judge_replies
    from schemas.steps.evaluate import JudgeSpec
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    judge = FirstPositionJudge(tok, bias=2.0)
    table = [{"prompt": "Copy: a b\nAnswer:", "reference": "a b", "reply": "a b"},
             {"prompt": "Copy: c d\nAnswer:", "reference": "c d", "reply": "d"}]
    lean = 1 / (1 + math.exp(-2.0))
    swapped = judge_replies(judge, tok, JudgeSpec(model="j", mode=mode, options=("A", "B")), [dict(r) for r in table])
    assert swapped["judge/score"] == pytest.approx(0.5)  # A in one order, B in the other: no preference left
    assert swapped["judge/position_bias"] == pytest.approx(lean - 0.5) and swapped["judge/questions"] == 4
    once = judge_replies(judge, tok, JudgeSpec(model="j", mode=mode, options=("A", "B"),
                                                    swap_positions=False), [dict(r) for r in table])
    assert once["judge/score"] == pytest.approx(lean) and once["judge/questions"] == 2
    # pairwise: the only non-matching reply ("d") was judged better than its reference: agreement 0;
    # pointwise: both called good, one of them wrong: agreement 1/2
    assert once["judge/agreement"] == (0.0 if mode == "pairwise" else 0.5)


def test_judge_runs_on_a_model_reference_in_the_step(tmp_path, tiny_lm):
    _, out = evaluate(tmp_path, model=str(tiny_lm), references={"builtin": "tasks", "n_per_task": 2,
                                                                 "max_new_tokens": 4, "tasks": ["copy"]},
                      judge={"model": str(tiny_lm), "mode": "pointwise"})
    m = out.metrics
    assert m["judge/questions"] == 4 and 0 < m["judge/score"] < 1 and abs(m["judge/position_bias"]) < 0.5


def test_judge_needs_references_and_pointwise_templates_name_the_reply():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="judge scores the replies that `references` generates"):
        EvaluateSpec(kind="evaluate", model="m", judge={"model": "m"})
    with pytest.raises(ValidationError, match=r"template must contain \{reply\} in pointwise mode"):
        EvaluateSpec(kind="evaluate", model="m", references={"builtin": "tasks"},
                     judge={"model": "m", "mode": "pointwise", "template": "{a} or {b}?"})


# -- lm-evaluation-harness -------------------------------------------------------------------------------------


def test_harness_accuracy_equals_our_choice_accuracy_on_the_same_rows(tmp_path, tiny_lm):
    """The harness's `acc` and llmcycle's choice accuracy pick the same choice on every row: both sum the
    log-probabilities of the choice's tokens (with its leading space) after the prompt, no special tokens."""
    from components.evaluate.harness import TASKS_FOLDER

    items = [{"name": t, "type": "choice", "file": str(TASKS_FOLDER / f"{t}.jsonl")} for t in ("sentiment", "polite")]
    ctx, out = evaluate(tmp_path, model=str(tiny_lm), tasks={"items": items},
                        lm_eval={"tasks": ["llmcycle_sentiment", "llmcycle_polite", "llmcycle_pydoc"], "batch_size": 8})
    m = out.metrics
    for t in ("sentiment", "polite"):
        assert m[f"lm_eval/llmcycle_{t}/acc"] == m[f"tasks/0shot/{t}"], t  # 40 rows each
    assert 0 <= m["lm_eval/llmcycle_sentiment/acc_norm"] <= 1 and "lm_eval/llmcycle_sentiment/acc_stderr" in m
    assert m["lm_eval/llmcycle_pydoc/word_perplexity"] > 1 and m["lm_eval/llmcycle_pydoc/bits_per_byte"] > 0
    full = json.loads((ctx.out_dir / "lm_eval.json").read_text())
    assert set(full["results"]) >= {"llmcycle_sentiment", "llmcycle_polite", "llmcycle_pydoc"}


def test_unknown_harness_task_is_named_with_a_suggestion(tmp_path, tiny_lm):
    with pytest.raises(ValueError, match="lm_eval.tasks: unknown task 'llmcycle_sentimnt' \\(did you mean "
                                         "'llmcycle_sentiment'\\?\\)"):
        evaluate(tmp_path, model=str(tiny_lm), lm_eval={"tasks": ["llmcycle_sentimnt"]})


def test_a_users_task_folder_is_included(tmp_path, tiny_lm):
    from components.evaluate.harness import TASKS_FOLDER

    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(f"""task: my_sentiment
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{TASKS_FOLDER / 'sentiment.jsonl'}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: "{{{{choices.index(answer)}}}}"
target_delimiter: ""
metric_list: [{{metric: acc}}]
""")
    _, out = evaluate(tmp_path, model=str(tiny_lm), lm_eval={"tasks": ["my_sentiment", "llmcycle_sentiment"],
                                                             "include_path": str(folder), "limit": 10})
    assert out.metrics["lm_eval/my_sentiment/acc"] == out.metrics["lm_eval/llmcycle_sentiment/acc"]
