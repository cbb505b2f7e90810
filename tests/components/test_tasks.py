"""The builtin task mixture: deterministic, held-out rows never in training, exact-match judging."""

from __future__ import annotations

import pytest

from components.lib.evaluation import exact_match
from components.lib.tasks import TASK_STYLE, TASKS, make_examples


def test_mixture_is_deterministic_by_seed_and_covers_the_tasks():
    a, b = make_examples(3, "train", 20), make_examples(3, "train", 20)
    assert a == b and a != make_examples(4, "train", 20)
    assert len(TASKS) >= 7 and "polite" in TASKS and {r["task"] for r in a} == set(TASKS)
    assert all(r["prompt"].endswith("\nAnswer:") and r["completion"] == f" {r['answer']}\n" for r in a)
    assert TASK_STYLE["add"] == "lookup" and TASK_STYLE["sentiment"] == "compositional"


def test_held_out_rows_never_appear_in_training():
    train = {r["prompt"] for r in make_examples(0, "train", 2000)}
    held = make_examples(0, "eval", 50)
    assert held and not any(r["prompt"] in train for r in held)
    # eval rows are distinct; add has only ~20 held-out operand pairs, the lookup task's honest limit
    counts = {t: sum(r["task"] == t for r in held) for t in TASKS}
    assert counts["copy"] == 50 and 10 <= counts["add"] < 50
    assert len({r["prompt"] for r in held}) == len(held)


def test_polite_task_shape():
    rows = make_examples(1, "train", 50, ["polite"])
    assert {r["answer"] for r in rows} == {"A", "B"}
    assert all(r["prompt"].startswith("Which reply is polite? (A) ") and " (B) " in r["prompt"] for r in rows)


def test_exact_match_normalizes_whitespace_but_not_case():
    row = {"answer": "Red Fox"}
    assert exact_match(" Red  Fox\nmore text", row["answer"])
    assert not exact_match(" red fox", row["answer"])
    assert not exact_match(" 71", "7")


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task.*'?multiply"):
        make_examples(0, "train", 1, ["multiply"])
    with pytest.raises(ValueError, match="split must be"):
        make_examples(0, "test", 1)


def test_schema_task_names_match_the_component():
    from schemas.data import BUILTIN_TASKS

    assert list(BUILTIN_TASKS) == TASKS


def test_polite_requests_are_held_out_combinations_with_reference_pairs():
    from components.lib.tasks import make_examples, polite_requests

    rows = polite_requests(0, 30)
    assert len(rows) == 30 and len({(r["chosen"], r["rejected"]) for r in rows}) == 30
    train = {r["prompt"] for r in make_examples(0, "train", 2000, ["polite"])}
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["prompt"].startswith("Ask someone to ")
        # the judge's training prompts never show this pair, in either order
        assert not any(f"(A) {r['chosen']} (B) {r['rejected']}" in t or f"(A) {r['rejected']} (B) {r['chosen']}" in t
                       for t in train)
