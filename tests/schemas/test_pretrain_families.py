"""pretrain's `model:` section for the families before transformers: what each takes, and one-line errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.steps.pretrain import ModelSpec, PretrainSpec


def error(**fields) -> str:
    with pytest.raises(ValidationError) as err:
        PretrainSpec(kind="pretrain", tokenizer="t", **fields)
    return str(err.value)


def test_each_family_takes_its_own_fields():
    assert ModelSpec(family="mlp", hidden=30, window=8, direct_connections=True).window == 8
    assert ModelSpec(family="lstm", layers=3, hidden=30).hidden == 30  # heads need not divide hidden
    assert PretrainSpec(kind="pretrain", tokenizer="t", model={"family": "rnn"}).objective == "causal"


def test_a_field_of_another_family_is_an_error_naming_it():
    assert "model.heads: transformers only, and family 'rnn' has no attention blocks; remove it" in \
        error(model={"family": "rnn", "heads": 4})
    assert "model.kv_heads, model.intermediate: transformers only, and family 'lstm'" in \
        error(model={"family": "lstm", "kv_heads": 2, "intermediate": 64})
    assert "model.window: family mlp only, not 'llama'; remove it or set family: mlp" in \
        error(model={"family": "llama", "window": 8})
    assert "model.window, model.direct_connections: family mlp only, not 'lstm'; remove them" in \
        error(model={"family": "lstm", "window": 8, "direct_connections": True})


def test_they_are_causal_and_sized_by_hand():
    assert "model.family 'lstm' does not fit objective 'masked'; causal takes llama, gpt2, mlp, rnn or lstm" in \
        error(model={"family": "lstm"}, objective="masked")
    assert "sizing shapes transformers (layers, hidden, heads); model.family 'mlp' is not one" in \
        error(model={"family": "mlp"}, sizing={"tokens": 40960})
