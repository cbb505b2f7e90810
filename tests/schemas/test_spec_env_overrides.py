"""`${env:NAME}` interpolation and `--set` overrides."""

from __future__ import annotations

import pytest

from schemas import SpecError, load

SPEC = """\
name: x
tracking: {uri: "sqlite:///${env:LLMCYCLE_TEST_DB}/mlflow.db"}
steps:
  tok:
    kind: tokenize
    corpus: {builtin: pydoc}
    vocab_size: 300
"""


def messages(path, overrides=None) -> list[str]:
    with pytest.raises(SpecError) as err:
        load(path, overrides)
    return [str(p) for p in err.value.problems]


def test_env_variable_is_interpolated_and_redacted(write_spec, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_TEST_DB", "/very/secret")
    loaded = load(write_spec(SPEC))
    assert loaded.spec.tracking.uri == "sqlite:////very/secret/mlflow.db"
    assert loaded.redacted()["tracking"]["uri"] == "sqlite:///${env:LLMCYCLE_TEST_DB}/mlflow.db"
    assert "/very/secret" not in str(loaded.redacted())


def test_missing_env_variable_is_named(write_spec, monkeypatch):
    monkeypatch.delenv("LLMCYCLE_TEST_DB", raising=False)
    path = write_spec(SPEC)
    assert messages(path) == [f"{path}:2:17: tracking.uri: environment variable LLMCYCLE_TEST_DB is not set "
                              "(referenced as ${env:LLMCYCLE_TEST_DB})"]


def test_invalid_secret_value_is_not_echoed(write_spec, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_TEST_SEED", "hunter2")
    path = write_spec("name: x\nseed: ${env:LLMCYCLE_TEST_SEED}\n"
                      "steps:\n  t: {kind: tokenize, corpus: {builtin: pydoc}}\n")
    [message] = messages(path)
    assert message.startswith(f"{path}:2:7: seed: Input should be a valid integer")
    assert "hunter2" not in message and message.endswith("got ${env:LLMCYCLE_TEST_SEED}")


def test_set_overrides_are_typed_like_the_yaml(write_spec, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_TEST_DB", "/tmp")
    path = write_spec(SPEC)
    loaded = load(path, ["steps.tok.vocab_size=4096", "steps.tok.corpus={files: [a.txt]}", "seed=7",
                         "steps.tok.algorithm=unigram"])
    step = loaded.spec.steps["tok"]
    assert (step.vocab_size, step.corpus.files, step.algorithm, loaded.spec.seed) == (4096, ["a.txt"], "unigram", 7)


def test_set_errors_are_named_like_the_yaml_and_reported_together(write_spec, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_TEST_DB", "/tmp")
    path = write_spec(SPEC + "    val_fraction: 2\n")
    found = messages(path, ["steps.tok.vocab_size=abc", "steps.tok.vocab_sise=3", "no_equals_sign",
                            "steps.tok.kind.x=1", "seed=-2"])
    assert found == [
        "--set[1]:1:22: steps.tok.vocab_size: Input should be a valid integer, unable to parse string as an "
        'integer, got "abc"',
        "--set[2]:1:1: steps.tok.vocab_sise: unknown key 'vocab_sise' (did you mean 'vocab_size'?); expected "
        "one of: kind, corpus, algorithm, vocab_size, min_frequency, val_fraction, lowercase, trainer, run_on, sweep",
        "--set[3]:1:1: expected KEY=VALUE, got 'no_equals_sign'",
        "--set[4]:1:1: steps.tok.kind.x: cannot set a field inside a value",
        "--set[5]:1:6: seed: Input should be greater than or equal to 0, got -2",
        f"{path}:8:19: steps.tok.val_fraction: Input should be less than 1, got 2",
    ]


def test_set_replaces_an_env_value(write_spec, monkeypatch):
    monkeypatch.delenv("LLMCYCLE_TEST_DB", raising=False)
    loaded = load(write_spec(SPEC), ["tracking.uri=http://mlflow:5000"])
    assert loaded.spec.tracking.uri == "http://mlflow:5000"
    assert loaded.redacted()["tracking"]["uri"] == "http://mlflow:5000"
