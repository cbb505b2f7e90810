"""Compute-optimal sizing: the numeric checks of ALGORITHMS.md §4 and `llmcycle plan` showing N, D and C."""

from __future__ import annotations

import pytest

from schemas import sizing


@pytest.mark.parametrize("rule", ["tokens_per_param", "closed_form"])
@pytest.mark.parametrize("flops", [1e15, 1e21, 5.76e23])
def test_both_allocators_spend_exactly_the_budget(rule, flops):
    n, d = sizing.allocate(flops, rule)
    assert 6 * n * d == pytest.approx(flops, rel=1e-9)


def test_fitted_loss_and_exponents():
    assert sizing.chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.9366, abs=1e-4)
    assert (round(sizing.EXP_N, 3), round(sizing.EXP_D, 3), round(sizing.G, 3)) == (0.452, 0.548, 1.345)


def test_allocations_at_1e21():
    n, d = sizing.allocate(1e21, "closed_form")
    assert (n, d) == (pytest.approx(1.824e9, rel=1e-3), pytest.approx(9.136e10, rel=1e-3))
    n, d = sizing.allocate(1e21, "tokens_per_param")
    assert (n, d) == (pytest.approx(2.887e9, rel=1e-3), pytest.approx(5.774e10, rel=1e-3))
    assert d == pytest.approx(20 * n)


@pytest.mark.parametrize("flops", [1e18, 1e21, 1e24])
def test_closed_form_minimises_the_fitted_loss_on_the_iso_flop_curve(flops):
    n_opt, _ = sizing.allocate(flops, "closed_form")
    best = sizing.chinchilla_loss(n_opt, flops / (6 * n_opt))
    for factor in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0):
        n = n_opt * factor
        assert sizing.chinchilla_loss(n, flops / (6 * n)) > best


def test_token_budget_inverts_the_allocation():
    for rule in ("tokens_per_param", "closed_form"):
        n, d = sizing.allocate(1e20, rule)
        n2, d2 = sizing.allocate_for_tokens(d, rule)
        assert (n2, d2) == (pytest.approx(n, rel=1e-9), d)


def test_shape_rounds_n_and_keeps_c_equal_6nd():
    shape = sizing.size_model("llama", flops=1e16)
    assert shape.params == sizing.block_params("llama", shape.layers, shape.hidden, shape.intermediate)
    assert shape.params == pytest.approx(shape.target_params, rel=0.35)
    assert shape.flops == pytest.approx(1e16, rel=1e-6)
    assert shape.hidden % shape.heads == 0
    with pytest.raises(ValueError, match="exactly one of flops or tokens"):
        sizing.size_model("llama")


def test_plan_shows_n_d_and_c(write_spec, capsys):
    from flows.cli import main

    path = write_spec("""
        name: scaling
        steps:
          tok: {kind: tokenize, corpus: {builtin: pydoc}}
          lm:
            kind: pretrain
            tokenizer: tok
            model: {family: llama, context: 64}
            sizing: {flops: 1.0e+13, rule: closed_form}
    """)
    assert main(["plan", str(path)]) == 0
    shown = capsys.readouterr().out
    shape = sizing.size_model("llama", flops=1e13, rule="closed_form")
    assert f"N={shape.params:,}" in shown and f"D={shape.tokens:,}" in shown and "C=6ND=1e+13" in shown
    assert f"layers={shape.layers} hidden={shape.hidden}" in shown
