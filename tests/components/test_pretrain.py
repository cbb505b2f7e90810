"""pretrain: causal and masked training, masking fractions, NaN guard, determinism, init_from, sizing."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import check_contract, make_ctx

TINY = {"family": "llama", "layers": 2, "hidden": 32, "heads": 2, "context": 64}


def pretrain_spec(**kw):
    from schemas.steps.pretrain import PretrainSpec

    base = dict(kind="pretrain", tokenizer="tokenizer", model=TINY, max_steps=30, val_every=15, batch_size=8,
                val_batches=2, checkpoint_every=15, optimizer={"lr": 3e-3}, log_model=False)
    return PretrainSpec(**{**base, **kw})


def run_pretrain(tmp_path, tokenized, name="base", **kw):
    from components import pretrain

    ctx = make_ctx(tmp_path, name=name, kind="pretrain", upstream={"tokenizer": tokenized})
    return ctx, pretrain.run(pretrain_spec(**kw), ctx)


def test_causal_pretrain_learns_and_saves_a_standard_model(tmp_path, tokenized):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx, out = run_pretrain(tmp_path, tokenized)
    m = out.metrics
    check_contract(pretrain_spec(), out)
    assert m["val/loss"] < m["before/val/loss"] - 0.2, m
    assert m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]))
    assert m["train/steps"] == 30 and m["train/tokens"] == 30 * 8 * 64
    folder = ctx.out_dir / out.outputs["model"]
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    ids = torch.tensor([tok("The for statement")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    assert (ctx.out_dir / "loss_curve.png").stat().st_size > 1000
    steps = [s for s, _ in out.info["curve"]]
    assert steps == [0, 15, 30]


def test_masked_pretrain_learns_and_loads_as_masked_lm(tmp_path, tokenized):
    from transformers import AutoModelForMaskedLM

    ctx, out = run_pretrain(tmp_path, tokenized, objective="masked", model={**TINY, "family": "bert"},
                            optimizer={"lr": 5e-3})
    check_contract(pretrain_spec(objective="masked", model={**TINY, "family": "bert"}), out)
    assert out.metrics["val/loss"] < out.metrics["before/val/loss"] - 0.2, out.metrics
    model = AutoModelForMaskedLM.from_pretrained(ctx.out_dir / "model")
    assert model.config.model_type == "bert"


def test_masking_selects_15_percent_of_non_special_tokens_80_10_10(tokenized):
    from components.lib.models import load_tokenizer
    from components.lib.scoring import make_collator, mask_tokens

    tok = load_tokenizer(str(tokenized.path("tokenizer")))
    special_ids = torch.tensor(sorted(tok.all_special_ids))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(len(special_ids), len(tok), (64, 512), generator=gen)
    ids[:, ::7] = tok.eos_token_id  # document separators must never be selected
    inputs, labels = mask_tokens(make_collator(tok, 0.15, seed=1), ids.clone(), special_ids)
    selected = labels != -100
    normal = ~torch.isin(ids, special_ids)
    assert not selected[~normal].any()
    assert selected[normal].float().mean().item() == pytest.approx(0.15, abs=0.01)
    as_mask = (inputs == tok.mask_token_id) & selected
    kept = (inputs == ids) & selected
    n = selected.sum().item()
    assert as_mask.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / len(tok), abs=0.02)  # random may redraw itself
    assert torch.equal(labels[selected], ids[selected])


def test_nan_loss_stops_with_step_and_global_step(tmp_path, tokenized):
    with pytest.raises(FloatingPointError, match=r"step 'base'.*global step \d+"):
        run_pretrain(tmp_path, tokenized, optimizer={"lr": 1e30}, grad_clip=None, max_steps=20)


def test_same_seed_gives_identical_metrics(tmp_path, tokenized):
    _, a = run_pretrain(tmp_path / "a", tokenized, max_steps=10, val_every=5)
    _, b = run_pretrain(tmp_path / "b", tokenized, max_steps=10, val_every=5)
    keep = ("val/loss", "before/val/loss", "train/loss")
    assert {k: a.metrics[k] for k in keep} == {k: b.metrics[k] for k in keep}


def test_init_from_local_folder_continues_training(tmp_path, tokenized, tiny_lm):
    from transformers import AutoModelForCausalLM

    ctx, out = run_pretrain(tmp_path, tokenized, model=None, init_from=str(tiny_lm), max_steps=15)
    assert out.metrics["val/loss"] < out.metrics["before/val/loss"]
    before = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    after = AutoModelForCausalLM.from_pretrained(ctx.out_dir / "model").state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sizing_builds_the_chosen_shape_and_token_budget(tmp_path, tokenized):
    from schemas.steps.pretrain import PretrainSpec

    model = {"family": "llama", "context": 64}
    spec = PretrainSpec(kind="pretrain", tokenizer="t", model=model, sizing={"tokens": 40960})
    shape = spec.sized()
    assert shape.tokens == 40960 and shape.target_params == 40960 / 20
    assert 40960 / 20 / 2 < shape.params < 2 * 40960 / 20  # rounded to a shape with hidden >= 16
    ctx, out = run_pretrain(tmp_path, tokenized, model=model, max_steps=None, sizing={"tokens": 40960})
    assert out.metrics["params/non_embedding"] >= shape.params  # plus norms
    assert out.metrics["train/tokens"] == 40960  # 80 steps of 8 x 64
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ctx.out_dir / "model")
    assert (config.num_hidden_layers, config.hidden_size) == (shape.layers, shape.hidden)


@pytest.mark.parametrize("body, message", [
    ({"model": TINY, "init_from": "./m"}, "exactly one of model"),
    ({"model": {**TINY, "family": "bert"}}, "does not fit objective 'causal'"),
    ({"model": {"family": "llama", "layers": 4}, "sizing": {"flops": 1e12}}, "sizing chooses model.layers"),
    ({"model": {"family": "llama"}, "sizing": {"flops": 1e12}, "max_steps": 5}, "sizing chooses the token budget"),
    ({"model": {"family": "llama"}, "sizing": {}}, "exactly one of flops or tokens"),
    ({"model": {**TINY, "heads": 3}}, "heads .3. must divide hidden"),
])
def test_bad_pretrain_specs_say_what_is_wrong(body, message):
    from pydantic import ValidationError

    from schemas.steps.pretrain import PretrainSpec

    with pytest.raises(ValidationError, match=message):
        PretrainSpec(kind="pretrain", tokenizer="t", **body)
