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


# -- where the time goes: start-up, data, compute, logging (components/lib/phases.py) -------------------------------


def test_a_block_inside_another_is_charged_once_to_the_inner_phase_and_the_rest_is_compute():
    import threading
    import time

    from components.lib import phases

    phases.reset()
    started = time.perf_counter()
    with phases.charge("logging"):
        time.sleep(0.05)
        with phases.charge("startup"):  # a model loaded to log it: start-up, and not logging as well
            time.sleep(0.1)
    worker = threading.Thread(target=lambda: phases.charged("data")(time.sleep)(0.2))
    worker.start(), worker.join()  # a helper thread's time overlaps this one's: not charged
    time.sleep(0.05)
    split = phases.spent(time.perf_counter() - started, launch=0.5)
    assert list(split) == [*ledger.PHASES, "launch"] and split["launch"] == 0.5
    assert split["startup"] == pytest.approx(0.5 + 0.1, abs=0.03)  # the engine's launch of the step is start-up
    assert split["logging"] == pytest.approx(0.05, abs=0.03) and split["data"] == 0
    assert sum(split[p] for p in ledger.PHASES) == pytest.approx(time.perf_counter() - started + 0.5, abs=0.01)
    with pytest.raises(ValueError, match="phase 'compute': expected one of startup, data, logging"):
        phases.begin("compute")


def test_the_ledger_shows_each_steps_split_and_its_share_of_the_wall_time():
    split = {"startup": 3.0, "data": 1.0, "compute": 14.0, "logging": 2.0}
    spent = ledger.build([Entry("lm", "pretrain", "ran", {"time/seconds": 20.0}, {"phases": split}),
                          Entry("ev", "evaluate", "ran", {"time/seconds": 4.5},  # launched 0.5 s after its task began
                                {"phases": {"startup": 1.0, "data": 0.0, "compute": 4.0, "logging": 0.0,
                                            "launch": 0.5}}),
                          Entry("old", "evaluate", "cached", {"time/seconds": 9.0}, {"phases": split})])
    row = spent["rows"][0]
    assert [row[f"{p}_seconds"] for p in ledger.PHASES] == [3.0, 1.0, 14.0, 2.0] and row["launch_seconds"] == 0
    assert spent["rows"][2]["compute_seconds"] is None  # a cached step spent nothing in this run
    assert spent["total"]["startup_seconds"] == 4.0 and spent["total"]["compute_seconds"] == 18.0
    text = ledger.text(spent).splitlines()
    start = text.index(next(line for line in text if line.startswith("where the time goes")))
    assert text[start + 1].split() == list(ledger.PHASE_HEADERS)
    assert text[start + 2].split() == ["lm", "20.0", "s", "3.0", "s", "15%", "1.0", "s", "5%", "14.0", "s", "70%",
                                       "2.0", "s", "10%"]
    assert text[start + 3].split()[:5] == ["ev", "5.0", "s", "1.0", "s"]  # the task: launch + wall time
    assert text[start + 5].split()[:5] == ["total", "25.0", "s", "4.0", "s"] and "16%" in text[start + 5]
    assert "| lm | 20.0 s | 3.0 s 15% | 1.0 s 5% | 14.0 s 70% | 2.0 s 10% |" in ledger.markdown(spent)
    # a run whose steps did not report their split (outputs made before it existed) shows no such table
    assert "where the time goes" not in ledger.text(ledger.build([trained()]))


PHASED_SPEC = """\
name: phased
workdir: work
trainer: {accelerator: cpu, precision: 32-true}
steps:
  tok: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 300}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {family: llama, layers: 1, hidden: 32, heads: 2, context: 32}
    max_steps: 6
    val_every: 3
    batch_size: 4
    log_model: false
  ev: {kind: evaluate, model: lm, tokens: tok}
"""


def test_each_steps_phases_add_up_to_its_wall_time_and_loading_a_model_is_startup(tmp_path):
    """The engine's own entry point (flows/step.py), in this process, on three real steps."""
    import json
    import time

    from flows.step import execute, StepRequest

    (tmp_path / "spec.yaml").write_text(PHASED_SPEC)
    upstream, results = {}, {}
    for i, (name, kind) in enumerate((("tok", "tokenize"), ("lm", "pretrain"), ("ev", "evaluate"))):
        out = tmp_path / "work" / name / "out"
        request = StepRequest(spec_path=str(tmp_path / "spec.yaml"), overrides=[], name=name, kind=kind,
                              fingerprint=f"{i}" * 64, output_dir=str(out), workdir=str(tmp_path / "work"),
                              resources={"accelerator": "cpu", "precision": "32-true"}, tracking_uri="",
                              upstream=dict(upstream))
        request.run_dir.mkdir(parents=True, exist_ok=True)
        request.launched_at = time.time() - 2.0  # as if its task had begun 2 s ago
        assert execute(request, own_process=False) == 0, (request.error_path.read_text()
                                                          if request.error_path.exists() else "")
        results[name] = json.loads((out / "result.json").read_text())
        upstream[name] = {**results[name], "dir": str(out)}
    for name, result in results.items():
        split, wall = result["info"]["phases"], result["metrics"]["time/seconds"]
        assert set(split) == {*ledger.PHASES, "launch"} and all(v >= 0 for v in split.values()), split
        assert 2.0 <= split["launch"] < 2.5 and split["startup"] > split["launch"]
        assert sum(split[p] for p in ledger.PHASES) == pytest.approx(split["launch"] + wall, abs=0.01), (name, split)
    assert results["lm"]["info"]["phases"]["startup"] > 0  # built its model (and imported, read the spec)
    assert results["lm"]["info"]["phases"]["data"] > 0  # Lightning fetched its batches
    assert results["lm"]["info"]["phases"]["logging"] > 0  # wrote its model folder and a checkpoint
    assert results["ev"]["info"]["phases"]["startup"] > results["ev"]["info"]["phases"]["launch"] + 0.01  # a load
    row = ledger.row(Entry("ev", "evaluate", "ran", results["ev"]["metrics"], results["ev"]["info"]))
    assert sum(row[f"{p}_seconds"] for p in ledger.PHASES) == pytest.approx(row["seconds"] + row["launch_seconds"],
                                                                            abs=0.01)
