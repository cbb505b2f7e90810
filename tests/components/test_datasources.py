"""Data at scale (components/lib/datasources.py): weighted mixtures, streamed JSONL, and the kinds that read them."""

from __future__ import annotations

import itertools
import json
import textwrap

import pytest

import schemas
from components.lib import datasources as ds
from components.lib.io import held_out, read_jsonl, split_rows
from components.lib.sft import encode_rows, load_rows
from components.lib.tasks import make_examples
from schemas.data import SftDataSpec
from tests.conftest import check_contract, make_ctx


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_file(tmp_path, name="notes.jsonl", n=40):
    """Task rows with an id each (distinct rows, as in real data), as a JSONL file."""
    rows = [{**r, "id": i} for i, r in enumerate(make_examples(1, "train", n, ["copy", "reverse"]))]
    return write_rows(tmp_path / name, rows)


def mixture(tmp_path, **extra) -> SftDataSpec:
    sft_file(tmp_path)
    return SftDataSpec.model_validate({"mixture": [{"files": ["notes.jsonl"], "weight": 0.7},
                                                   {"builtin": "tasks", "tasks": ["copy"], "n_per_task": 40,
                                                    "eval_per_task": 4, "weight": 0.3}], **extra})


def test_weights_are_realised_and_each_source_walks_its_own_shuffle(tmp_path):
    a = ds.Source("a", 0.7, [{"a": i} for i in range(50)], [])
    b = ds.Source("b", 0.3, [{"b": i} for i in range(10)], [])
    draws = ds.Draws([a, b], seed=0)
    counts = draws.counts(20_000)
    assert abs(counts[0] / 20_000 - 0.7) < 0.01 and sum(counts) == 20_000  # 3 sigma of a binomial is 0.0097
    indexed = list(itertools.islice(draws.indexed(), 400))
    assert [k for k, _ in indexed] == list(itertools.islice(ds.picks([0.7, 0.3], 0), 400))  # picks ignore the rows
    from_b = [row["b"] for k, row in indexed if k == 1]
    assert sorted(from_b[:10]) == list(range(10)) and sorted(from_b[10:20]) == list(range(10))  # no repeat per pass
    assert from_b[:10] != from_b[10:20]  # reshuffled when exhausted


def test_a_loaded_mixture_is_one_seeded_pass_with_its_proportions(tmp_path):
    data = mixture(tmp_path)
    train, held = load_rows(data, 0, lambda p: tmp_path / p)
    kept, out = split_rows(read_jsonl(tmp_path / "notes.jsonl"), data.eval_fraction, 0)
    assert isinstance(train, ds.MixedRows) and len(train) == len(kept) + 40  # default size: the sum of the sources
    assert held == out + make_examples(0, "eval", 4, ["copy"])  # each source's own held-out rows, concatenated
    m = ds.mixture_metrics(train)
    assert abs(m["data/mixture/notes"] - 0.7) < 0.08 and m["data/mixture/notes/rows"] + m["data/mixture/builtin/rows"] \
        == len(train)
    assert sum(1 for r in train if "_where" in r) == m["data/mixture/notes/rows"]  # the counts are the rows'
    again, _ = load_rows(data, 0, lambda p: tmp_path / p)
    other, _ = load_rows(data, 1, lambda p: tmp_path / p)
    assert list(again) == list(train) and list(other) != list(train)
    sized, _ = load_rows(data.model_copy(update={"mixture_size": 1000}), 0, lambda p: tmp_path / p)
    assert len(sized) == 1000 and abs(ds.mixture_metrics(sized)["data/mixture/notes"] - 0.7) < 0.05


def test_a_streamed_file_splits_as_the_loaded_one(tmp_path):
    path = sft_file(tmp_path, n=150)
    kept, out = split_rows(read_jsonl(path), 0.1, 0)
    stream = ds.JsonlStream([path], 0.1, seed=0, buffer=16)
    assert stream.held == out and list(stream.kept()) == kept
    one_pass = list(itertools.islice(stream.passes(0), len(kept)))
    assert sorted(r["_where"] for r in one_pass) == sorted(r["_where"] for r in kept) and one_pass != kept
    assert ds.JsonlStream([path], 0.1, seed=0, max_held=5).held == out[:5]  # the others: not trained on, not scored
    # split_rows holds the last row out when the hash holds none; so does the stream
    rows = [{"k": 1}, {"k": 2}, {"k": 3}]
    assert not any(held_out(r, 0.01, 0) for r in rows)
    small = write_rows(tmp_path / "small.jsonl", rows)
    kept, out = split_rows(read_jsonl(small), 0.01, 0)
    stream = ds.JsonlStream([small], 0.01, seed=0)
    assert out == read_jsonl(small)[-1:] and stream.held == out and list(stream.kept()) == kept


def test_load_rows_streams_by_setting_and_by_size(tmp_path, monkeypatch):
    sft_file(tmp_path)
    data = SftDataSpec.model_validate({"files": ["notes.jsonl"], "stream": True})
    train, held = load_rows(data, 0, lambda p: tmp_path / p)
    loaded_train, loaded_held = load_rows(data.model_copy(update={"stream": False}), 0, lambda p: tmp_path / p)
    assert isinstance(train, ds.Draws) and not train.mixed and held == loaded_held
    assert sorted(r["_where"] for r in train.head(len(loaded_train))) == sorted(r["_where"] for r in loaded_train)
    assert isinstance(load_rows(data.model_copy(update={"stream": "auto"}), 0, lambda p: tmp_path / p)[0], list)
    monkeypatch.setattr(ds, "STREAM_ABOVE", 100)  # auto: a source whose files total more than this
    assert isinstance(load_rows(data.model_copy(update={"stream": "auto"}), 0, lambda p: tmp_path / p)[0], ds.Draws)


def test_a_bad_line_in_a_streamed_file_names_file_and_line(tmp_path):
    path = sft_file(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:6] + ['{"prompt": "x", "completion": ' ] + lines[6:]) + "\n")
    data = SftDataSpec.model_validate({"files": ["notes.jsonl"], "stream": True})
    with pytest.raises(ValueError, match=rf"{path}:7: not valid JSON"):
        ds.Draws([ds.Source("d", 1.0, ds.JsonlStream([path], None, 0), [])], 0).head(100)
    with pytest.raises(ValueError, match=rf"{path}:7: not valid JSON"):
        load_rows(data, 0, lambda p: tmp_path / p)  # the held-out rows are read first
    path.write_text("\n".join(lines[:3] + ["[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:4: expected a JSON object, got list"):
        load_rows(data, 0, lambda p: tmp_path / p)


def test_the_encoded_stream_yields_what_the_kinds_encoders_make(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    from components.lib.preferences import builtin_pairs, encode_pairs, normalize_pair

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    train, _ = load_rows(SftDataSpec.model_validate({"files": [str(sft_file(tmp_path))], "stream": True}), 0,
                         lambda p: tmp_path / p)
    encode = lambda rows: encode_rows(rows, tok, 64)  # noqa: E731
    assert list(itertools.islice(ds.EncodedStream(train, encode), 20)) == encode_rows(train.head(20), tok, 64)
    pairs = [normalize_pair(r) for r in builtin_pairs(0, "train", 8, ["copy"])]
    draws = ds.Draws([ds.Source("p", 1.0, pairs, [])], 0)
    got = list(itertools.islice(ds.EncodedStream(draws, lambda rows: encode_pairs(rows, tok, 64)), 5))
    assert got == encode_pairs(draws.head(5), tok, 64) and set(got[0]) == {"chosen", "rejected", "score"}


def test_a_mixture_finetune_runs_end_to_end_and_logs_the_proportions(tiny_lm, tmp_path, capsys):
    from components import finetune
    from schemas.steps.finetune import FinetuneSpec

    data = mixture(tmp_path).model_dump(exclude_unset=True)
    spec = FinetuneSpec.model_validate({"kind": "finetune", "model": str(tiny_lm), "data": data, "max_steps": 4,
                                        "batch_size": 8, "val_every": 4, "val_batches": 1, "peft": {"method": "full"},
                                        "evaluation": {"shots": 1, "base": False, "max_new_tokens": 4}})
    out = finetune.run(spec, make_ctx(tmp_path, name="sft", kind="finetune", base_dir=tmp_path))
    check_contract(spec, out)
    m = out.metrics
    assert abs(m["data/mixture/notes"] - 0.7) < 0.08 and abs(m["data/mixture/builtin"] - 0.3) < 0.08
    assert m["data/mixture/notes/rows"] + m["data/mixture/builtin/rows"] == out.info["effort"]["examples"]
    assert "sft: mixture of" in capsys.readouterr().out and "tasks/1shot/copy" in m


def test_a_streamed_finetune_trains_on_the_budget_it_is_given(tiny_lm, tmp_path, monkeypatch):
    from components import finetune
    from schemas.steps.finetune import FinetuneSpec

    sft_file(tmp_path, n=60)
    spec = FinetuneSpec.model_validate({"kind": "finetune", "model": str(tiny_lm), "max_steps": 3, "batch_size": 8,
                                        "val_every": 3, "val_batches": 1, "peft": {"method": "lora", "r": 4},
                                        "data": {"files": ["notes.jsonl"], "stream": True, "max_length": 64},
                                        "evaluation": {"shots": 1, "base": False, "max_new_tokens": 4}})
    out = finetune.run(spec, make_ctx(tmp_path, name="sft", kind="finetune", base_dir=tmp_path))
    check_contract(spec, out)
    assert out.metrics["train/steps"] == 3 and out.info["effort"]["examples"] == 24 and "val/loss" in out.metrics
    assert "tasks/1shot/accuracy" in out.metrics  # scored on the streamed held-out rows, shots from drawn rows
    monkeypatch.setattr(ds, "STREAM_ABOVE", 100)  # auto streams it now: replay has no loaded rows to join
    replay = spec.model_copy(update={"data": spec.data.model_copy(update={"stream": "auto"}), "replay": 0.2,
                                     "tokens": "tok"})
    with pytest.raises(ValueError, match="replay adds pretraining blocks .* set data.stream: false"):
        finetune.run(replay, make_ctx(tmp_path, name="sft2", kind="finetune", base_dir=tmp_path))


def test_a_streamed_preference_mixture_trains_dpo_and_the_reward_model_needs_a_step_budget(tiny_lm, tmp_path,
                                                                                          monkeypatch):
    from components import dpo, reward_model
    from components.lib.preferences import builtin_pairs
    from schemas.steps.dpo import DpoSpec
    from schemas.steps.reward_model import RewardModelSpec

    write_rows(tmp_path / "pairs.jsonl", [{**r, "id": i} for i, r in enumerate(builtin_pairs(3, "train", 12))])
    data = {"mixture": [{"files": ["pairs.jsonl"], "weight": 1}, {"builtin": "preferences", "tasks": ["copy"],
                                                                 "n_per_task": 8, "weight": 1}],
            "stream": True, "max_length": 64}
    spec = DpoSpec.model_validate({"kind": "dpo", "model": str(tiny_lm), "data": data, "max_steps": 2,
                                   "batch_size": 4, "val_every": 2, "val_batches": 1, "peft": {"method": "lora", "r": 4}})
    out = dpo.run(spec, make_ctx(tmp_path, name="align", kind="dpo", base_dir=tmp_path))
    check_contract(spec, out)
    m = out.metrics
    assert m["data/train_pairs"] == 8 == m["data/mixture/pairs/rows"] + m["data/mixture/builtin/rows"]
    monkeypatch.setattr(ds, "STREAM_ABOVE", 100)
    rm = RewardModelSpec.model_validate({"kind": "reward_model", "model": str(tiny_lm), "batch_size": 4,
                                         "data": {"files": ["pairs.jsonl"], "max_length": 64}})
    with pytest.raises(ValueError, match="data is streamed .* give max_steps or max_tokens"):
        reward_model.run(rm, make_ctx(tmp_path, name="rm", kind="reward_model", base_dir=tmp_path))


SPEC = """\
name: mix
steps:
  tokenizer: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 512}
  base: {kind: pretrain, tokenizer: tokenizer, model: {family: llama, layers: 2, hidden: 64, heads: 4}, max_steps: 5}
  mix:
    kind: finetune
    model: base
    data:
      mixture:
        - {builtin: tasks, weight: 0.7}
        - {step: STEP, weight: 0.3}
  cai:
    kind: constitutional
    model: base
    feedback_model: base
    principles: [polite]
    prompts: {builtin: polite}
"""


def test_a_mixtures_step_source_is_planned_first_and_a_bad_one_is_a_spec_error(tmp_path, capsys):
    from flows.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(SPEC.replace("STEP", "cai"))
    assert main(["plan", str(good)]) == 0
    shown = capsys.readouterr().out
    assert [line.split()[0] for line in shown.splitlines() if not line.startswith(" ")] == \
        ["tokenizer", "base", "cai", "mix"]
    assert "data: mixture of builtin 70%, cai 30%" in shown
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("STEP", "cia"))
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(bad)
    assert str(err.value) == f"{bad}:11:18: steps.mix.data.mixture[1].step: no step named 'cia' (did you mean 'cai'?)"


@pytest.mark.parametrize("data, where, message", [
    ("{mixture: [{builtin: tasks, weight: 0}]}", "steps.sft.data.mixture[0].weight", "greater than 0"),
    ("{mixture: []}", "steps.sft.data.mixture", "at least 1 item"),
    ("{files: [a.jsonl], mixture: [{builtin: tasks}]}", "steps.sft.data",
     "mixture holds the sources: move files into one of its entries"),
    ("{mixture: [{builtin: tasks, files: [a.jsonl]}]}", "steps.sft.data.mixture[0]",
     "give exactly one of files, builtin, step (got files, builtin)"),
    ("{mixture: [{builtin: tasks}, {builtin: tasks, tasks: [copy]}]}", "steps.sft.data",
     "more than one source is named 'builtin'"),
    ("{builtin: tasks, mixture_size: 10}", "steps.sft.data", "mixture_size goes with mixture"),
])
def test_mixture_spec_errors_name_the_field_and_line(tmp_path, data, where, message):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: p
        steps:
          sft:
            kind: finetune
            model: hf:x
            data: {data}
        """))
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(path)
    (problem,) = err.value.problems
    assert problem.path == where and message in problem.message and problem.line == 6


def test_settings_a_stream_cannot_honour_are_spec_errors():
    from pydantic import ValidationError

    from schemas.steps.finetune import FinetuneSpec
    from schemas.steps.reward_model import RewardModelSpec

    stream = {"files": ["a.jsonl"], "stream": True}
    with pytest.raises(ValidationError, match="epochs cannot be counted: give max_steps or max_tokens"):
        RewardModelSpec.model_validate({"kind": "reward_model", "model": "hf:x", "data": stream})
    with pytest.raises(ValidationError, match="packing.strategy bfd packs the whole training set once"):
        FinetuneSpec.model_validate({"kind": "finetune", "model": "hf:x", "data": stream,
                                     "packing": {"strategy": "bfd"}})
