"""optimize: merged adapter, pruning to a sparsity, an int8 model that loads back, and the before/after table."""

from __future__ import annotations

import pytest
import torch

from components import optimize
from components.lib.models import load_model
from components.lib.peft import sparsity_of
from schemas.steps.optimize import OptimizeSpec
from tests.conftest import check_contract, finish, make_ctx

MEASURE = {"tokens": "tokenizer", "context": 32, "batches": 2, "batch_size": 4, "new_tokens": 8, "repeats": 1}


@pytest.fixture(scope="module")
def adapter(tiny_lm, tmp_path_factory):
    """A LoRA adapter on the tiny model, with a nonzero B so it changes the outputs, as a finetune step's result."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components.lib.context import StepResult

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), LoraConfig(r=4, lora_alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    folder = tmp_path_factory.mktemp("sft")
    model.save_pretrained(folder / "adapter")
    return StepResult("sft", "finetune", "f" * 64, folder, {"adapter": "adapter"}, {}), model.eval()


def test_merge_prune_quantize_and_measure(tmp_path, tiny_lm, tokenized, adapter):
    sft, peft_model = adapter
    spec = OptimizeSpec(kind="optimize", model=str(tiny_lm), adapter="sft", prune={"sparsity": 0.5},
                        measure=MEASURE)
    ctx = make_ctx(tmp_path, name="opt", kind="optimize", upstream={"sft": sft, "tokenizer": tokenized})
    out = optimize.run(spec, ctx)
    check_contract(spec, out)
    result = finish(ctx, out)

    m = out.metrics
    for variant in ("baseline", "pruned", "int8"):
        assert m[f"{variant}/size_mb"] > 0 and m[f"{variant}/ms_per_token"] > 0 and m[f"{variant}/perplexity"] > 1
    assert m["pruned/sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m["int8/size_ratio"] < 0.6  # int8 weights in the blocks; embeddings stay float
    assert "baseline" in out.info["table"] and "int8" in out.info["table"]

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    pruned = AutoModelForCausalLM.from_pretrained(result.path("model")).eval()
    assert sparsity_of(pruned) == pytest.approx(0.5, abs=0.01)
    assert not (result.path("model") / "adapter_config.json").exists()
    qmodel, tokenizer = load_model(result.path("quantized"))
    with torch.no_grad():
        float_logits, int8_logits = pruned(ids).logits, qmodel(ids).logits
    assert any("quantized" in type(mod).__module__ for mod in qmodel.modules())
    # int8 rounding changes the logits a little, not the model's behaviour
    assert (int8_logits - float_logits).abs().max() < 0.1 * float_logits.abs().max()
    assert (int8_logits.argmax(-1) == float_logits.argmax(-1)).float().mean() > 0.8


def test_merge_only_equals_the_adapter_model(tmp_path, tiny_lm, tokenized, adapter):
    sft, peft_model = adapter
    spec = OptimizeSpec(kind="optimize", model=str(tiny_lm), adapter="sft", quantize="none",
                        measure={**MEASURE, "tokens": None})
    ctx = make_ctx(tmp_path, name="merge", kind="optimize", upstream={"sft": sft})
    out = optimize.run(spec, ctx)
    assert set(out.outputs) == {"model"} and "baseline/perplexity" not in out.metrics

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(ctx.out_dir / "model").eval()
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
