"""PEFT correctness (ALGORITHMS.md §5): identity at init, what trains, merge equivalence, prune, bitfit."""

from __future__ import annotations

import pytest
import torch

from components.lib.peft import apply_peft, is_bitfit_param, save_outputs, sparsity_of
from schemas.peft import PeftSpec


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def train_one_step(model, lr: float = 1e-2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapter_equals_base_at_init_and_trains_only_adapter_params(method):
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=X).logits
    model = apply_peft(base, PeftSpec(method=method))
    with torch.no_grad():
        assert torch.equal(model(input_ids=X).logits, expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f"{method}_" in n for n in trainable)


def test_lora_parameter_count_gradients_and_scaling():
    model = apply_peft(tiny_llama(), PeftSpec(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.numel() + b.numel() == 4 * (32 + 32)  # r(d_in + d_out)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * 4 * 64
    assert layer.scaling["default"] == 8 / 4
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    assert float(a.grad.abs().sum()) == 0.0 and float(b.grad.abs().sum()) > 0  # B = 0 at init
    rs = apply_peft(tiny_llama(), PeftSpec(method="lora", r=4, alpha=8, use_rslora=True))
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)


@pytest.mark.parametrize("options", [{}, {"use_dora": True}])
def test_merged_and_unmerged_outputs_agree_and_adapter_reloads(tmp_path, options):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = apply_peft(tiny_llama(), PeftSpec(method="lora", r=4, target_modules=["all-linear"], **options))
    for _ in range(3):
        train_one_step(model, lr=0.5)
    with torch.no_grad():
        tuned = model(input_ids=X).logits
        assert not torch.allclose(tuned, tiny_llama()(input_ids=X).logits, atol=1e-4)  # the adapter learned
    tok = _tokenizer()
    outputs = save_outputs(model, tok, tmp_path, merge=True)
    assert outputs["adapter"] == "adapter" and outputs["model"] == "model"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=X).logits, tuned, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=X).logits, tuned, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(input_ids=X).logits, tuned)  # merging worked on a copy


def test_prompt_tuning_changes_only_virtual_token_embeddings():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_peft(base, PeftSpec(method="prompt_tuning", num_virtual_tokens=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.default.embedding.weight"]
    prompt_before = trainable["prompt_encoder.default.embedding.weight"].detach().clone()
    train_one_step(model, lr=1.0)
    assert not torch.equal(trainable["prompt_encoder.default.embedding.weight"], prompt_before)
    after = model.base_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_prompt_tuned_model_is_scored_on_its_input_positions():
    from components.lib.scoring import Window, score_windows

    model = apply_peft(tiny_llama(), PeftSpec(method="prompt_tuning", num_virtual_tokens=4))
    windows = [Window(input_ids=[1, 2, 3, 4], targets=[3, 4, 5]), Window(input_ids=[1, 6], targets=[6, 7])]
    scores = score_windows(model, windows, batch_size=2, pad_id=0)  # the forgetting report of prompt tuning
    assert scores.count == 5 and scores.nll > 0


def test_prompt_tuning_init_from_text(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    embed = base.get_input_embeddings().weight.detach().clone()
    model = apply_peft(base, PeftSpec(method="prompt_tuning", num_virtual_tokens=3, init_text="Answer the"), tok)
    ids = tok("Answer the", add_special_tokens=False)["input_ids"]
    virtual = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(virtual[0], embed[ids[0 % len(ids)]])


def test_prune_reaches_target_sparsity_and_keeps_it_through_training(tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_peft(tiny_llama(), PeftSpec(method="prune", sparsity=0.6))
    assert sparsity_of(model) == pytest.approx(0.6, abs=0.01)
    for _ in range(3):
        train_one_step(model, lr=0.5)
    assert sparsity_of(model) == pytest.approx(0.6, abs=0.01)
    save_outputs(model, _tokenizer(), tmp_path, merge=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert sparsity_of(loaded) == pytest.approx(0.6, abs=0.01)
    assert float(loaded.model.embed_tokens.weight.eq(0).float().mean()) < 0.01  # embeddings stay dense


def test_bitfit_trains_only_biases_and_norms():
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, PeftSpec(method="bitfit"))
    train_one_step(model, lr=0.5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_bitfit_param(n) for n in changed)
    assert any(n.endswith(".bias") for n in changed) and any("ln_" in n for n in changed)


def test_peft_spec_rejects_fields_of_another_method():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="peft method 'ia3' takes no r .*r belongs to lora"):
        PeftSpec(method="ia3", r=4)
    with pytest.raises(ValidationError, match="takes no sparsity"):
        PeftSpec(method="lora", sparsity=0.3)
    with pytest.raises(ValidationError, match="subset of target_modules"):
        PeftSpec(method="ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])


def _tokenizer():
    """A small tokenizer object to save beside the weights (the tests build models from configs)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
