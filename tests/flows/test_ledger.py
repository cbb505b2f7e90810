"""The ledger's rows from step results: FLOPs 6·N·D training and 2·N·D inference, blanks where a step does not
know a figure, totals of this run and with the cached steps, and the tables."""

from __future__ import annotations

import pytest

from flows import ledger
from flows.ledger import Entry

N_POLICY, N_REFERENCE = 1_000_000, 250_000


def model(params: int, trainable: int = 0, train: int = 0, inference: int = 0) -> dict:
    return {"params": params, "trainable": trainable, "train_tokens": train, "inference_tokens": inference}


def trained(status: str = "ran") -> Entry:
    """A step whose policy trained on 4,096 positions and scored 1,024, and whose frozen reference scored 4,096."""
    return Entry("dpo", "dpo", status, {"time/seconds": 12.5, "params/trainable": 8_000, "params/total": N_POLICY},
                 {"effort": {"examples": 64, "examples_of": "pairs",
                             "models": [model(N_POLICY, 8_000, train=4096, inference=1024),
                                        model(N_REFERENCE, inference=4096)]}})


def test_flops_are_6nd_for_training_and_2nd_for_inference():
    row = ledger.row(trained())
    assert row["flops"] == 6 * N_POLICY * 4096 + 2 * N_POLICY * 1024 + 2 * N_REFERENCE * 4096
    assert (row["train_tokens"], row["inference_tokens"], row["tokens"]) == (4096, 5120, 9216)
    assert (row["params_trainable"], row["params_total"]) == (8_000, N_POLICY)  # the step's own metrics
    assert (row["examples"], row["examples_of"], row["seconds"]) == (64, "pairs", 12.5)

    evaluation = ledger.row(Entry("ev", "evaluate", "ran", {"time/seconds": 3.0},
                                  {"effort": {"models": [model(N_REFERENCE, inference=2048)]}}))
    assert evaluation["flops"] == 2 * N_REFERENCE * 2048
    assert (evaluation["params_trainable"], evaluation["params_total"]) == (0, N_REFERENCE)  # from its model


def test_figures_a_step_does_not_know_stay_blank():
    tokenizer = ledger.row(Entry("tok", "tokenize", "ran", {"time/seconds": 2.0},
                                 {"effort": {"examples": 40, "examples_of": "documents", "tokens": 12_345,
                                             "models": []}}))
    assert tokenizer["tokens"] == 12_345 and tokenizer["examples"] == 40
    assert tokenizer["flops"] is tokenizer["params_total"] is tokenizer["params_trainable"] is None
    assert tokenizer["train_tokens"] is tokenizer["inference_tokens"] is tokenizer["labels"] is None

    # an output made before the engine counted effort: only what its metrics say
    old = ledger.row(Entry("lm", "pretrain", "cached", {"time/seconds": 60.0, "train/tokens": 51_200.0,
                                                       "train/flops": 3.0e11, "params/total": 1.0e6}))
    assert (old["tokens"], old["flops"], old["params_total"], old["params_trainable"]) == (51_200, 3.0e11, 10**6, None)
    assert (old["seconds"], old["original_seconds"]) == (0.0, 60.0)  # no time spent on it in this run
    assert ledger.row(Entry("ev", "evaluate", "ran", {"time/seconds": 1.0}))["flops"] is None

    failed = ledger.row(Entry("bad", "evaluate", "failed", seconds=1.5))
    assert failed["seconds"] == 1.5 and all(failed[k] is None for k in ("tokens", "flops", "params_total", "examples"))
    assert ledger.row(Entry("after", "register", "skipped"))["seconds"] is None


def test_totals_add_this_runs_work_and_separately_the_cached_steps():
    labelled = Entry("cai", "constitutional", "ran", {"time/seconds": 30.0},
                     {"effort": {"examples": 8, "examples_of": "prompts", "labels": 4,
                                 "models": [model(N_POLICY, N_POLICY, train=1000, inference=3000)]}})
    tokenizer = Entry("tok", "tokenize", "ran", {"time/seconds": 2.0}, {"effort": {"tokens": 500, "models": []}})
    spent = ledger.build([tokenizer, trained("cached"), labelled, Entry("bad", "evaluate", "failed", seconds=1.5),
                          Entry("after", "register", "skipped")], seconds=40.0)
    assert [r["step"] for r in spent["rows"]] == ["tok", "dpo", "cai", "bad", "after"]
    total, everything = spent["total"], spent["total_with_cached"]
    assert total["seconds"] == 2.0 + 30.0 + 1.5  # the cached step's 12.5 s were spent in an earlier run
    assert total["tokens"] == 500 + 4000 and total["labels"] == 4
    assert total["flops"] == 6 * N_POLICY * 1000 + 2 * N_POLICY * 3000  # the tokenizer's blank adds nothing
    dpo = ledger.row(trained())
    assert everything["seconds"] == total["seconds"] + 12.5
    assert everything["flops"] == total["flops"] + dpo["flops"] and everything["tokens"] == total["tokens"] + 9216
    assert spent["pipeline_seconds"] == 40.0

    assert ledger.build([trained()])["total_with_cached"] is None
    again = ledger.build([trained("cached")])["total"]
    assert again["seconds"] == again["tokens"] == again["flops"] == 0  # a run that reused everything spent nothing
    assert ledger.build([Entry("tok", "tokenize", "ran", {"time/seconds": 1.0})])["total"]["flops"] is None


def test_tables_align_and_use_human_units():
    spent = ledger.build([Entry("tok", "tokenize", "ran", {"time/seconds": 2.04},
                                {"effort": {"examples": 40, "examples_of": "documents", "tokens": 12_345}}),
                          trained("cached"), Entry("bad", "evaluate", "failed", seconds=65.0)], seconds=80.0)
    lines = ledger.text(spent).splitlines()
    assert lines[0].split() == list(ledger.HEADERS)
    assert lines[1].split() == ["tok", "tokenize", "ran", "2.0", "s", "12.3", "k", "-", "-", "-", "40", "documents",
                                "-"]
    assert lines[2].split()[:10] == ["dpo", "dpo", "cached", "0", "s", "9.22", "k", "28.7", "GFLOP", "8"]
    assert lines[3].split()[:5] == ["bad", "evaluate", "failed", "1m", "05s"]
    assert set(lines[4]) == {"-"} and lines[5].startswith("total ") and lines[6].startswith("total incl. cached")
    assert len({len(line) for line in lines[:4]}) == 1  # one width: every column aligned
    assert "pipeline wall time 1m 20s" in lines[-1]

    table = ledger.markdown(spent).splitlines()
    assert table[0] == "| " + " | ".join(ledger.HEADERS) + " |"
    assert table[2].startswith("| tok | tokenize | ran | 2.0 s | 12.3 k | - |")
    assert table[5].startswith("| **total** |") and table[6].startswith("| **total incl. cached** |")


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (0, "0 s"), (3.21, "3.2 s"), (245, "4m 05s"),
                                            (7800, "2h 10m")])
def test_durations(seconds, shown):
    assert ledger.duration(seconds) == shown


@pytest.mark.parametrize("n, shown", [(None, "-"), (0, "0"), (812, "812"), (12_345, "12.3 k"), (4_560_000, "4.56 M"),
                                      (1.2e9, "1.2 G"), (999_999, "1 M")])
def test_counts(n, shown):
    assert ledger.count(n) == shown


@pytest.mark.parametrize("n, shown", [(None, "-"), (0, "0"), (3.4e9, "3.4 GFLOP"), (1.2e15, "1.2 PFLOP"),
                                      (2.5e21, "2.5 ZFLOP")])
def test_flops_units(n, shown):
    assert ledger.flop(n) == shown
