"""optimize: merged adapter, pruning to a sparsity, bf16/int8/int4 variants that load back, the before/after table."""

from __future__ import annotations

import pytest
import torch

from components import optimize
from components.lib import quantize
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


# Held-out perplexity of each variant over that of the float model it was made from, at most (the tiny model is
# untrained, so these bound rounding noise more than they measure a trained model's loss; the benchmark does that).
TOLERANCE = {"bf16": 1.02, "int8": 1.02, "int4": 1.10}
# Per variant: the largest logit change over the largest logit, and the least share of unchanged top-1 tokens. An
# untrained model's top tokens are near ties that 4-bit rounding swaps, so int4 is held to its perplexity above.
LOGITS = {"bf16": (0.05, 0.9), "int8": (0.05, 0.9), "int4": (0.5, None)}


def test_merge_prune_quantize_and_measure(tmp_path, tiny_lm, tokenized, adapter):
    sft, peft_model = adapter
    spec = OptimizeSpec(kind="optimize", model=str(tiny_lm), adapter="sft", prune={"sparsity": 0.5},
                        quantize=["bf16", "int8", "int4"], measure=MEASURE)
    ctx = make_ctx(tmp_path, name="opt", kind="optimize", upstream={"sft": sft, "tokenizer": tokenized})
    out = optimize.run(spec, ctx)
    check_contract(spec, out)
    result = finish(ctx, out)

    m = out.metrics
    for variant in ("baseline", "pruned", "bf16", "int8", "int4"):
        assert m[f"{variant}/size_mb"] > 0 and m[f"{variant}/ms_per_token"] > 0 and m[f"{variant}/perplexity"] > 1
        assert variant in out.info["table"]
    assert m["pruned/sparsity"] == pytest.approx(0.5, abs=0.01)
    for variant, most in TOLERANCE.items():  # made from the pruned model
        assert m[f"{variant}/perplexity"] / m["pruned/perplexity"] == pytest.approx(1, abs=most - 1), variant
    assert m["bf16/size_ratio"] == pytest.approx(0.5, abs=0.01)
    assert m["bf16/memory_ratio"] == pytest.approx(0.5, abs=0.01)
    # int8 and int4 weights in the blocks; embeddings and LM head stay float32 (int4: bf16)
    assert m["int8/size_ratio"] < 0.65 and m["int8/memory_ratio"] < 0.65
    assert m["int4/size_ratio"] == pytest.approx(0.5, abs=0.01)  # stored as bf16, quantized as it loads
    assert m["int4/memory_ratio"] < m["int8/memory_ratio"] - 0.1

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    pruned = AutoModelForCausalLM.from_pretrained(result.path("model")).eval()
    assert sparsity_of(pruned) == pytest.approx(0.5, abs=0.01)
    assert not (result.path("model") / "adapter_config.json").exists()
    with torch.no_grad():
        float_logits = pruned(ids).logits
    for variant, (change, same) in LOGITS.items():  # every variant loads as every model reference does
        qmodel, tokenizer = load_model(result.path(variant))
        with torch.no_grad():
            logits = qmodel.eval()(ids).logits.float()
        # rounding changes the logits a little, not the model's behaviour
        assert (logits - float_logits).abs().max() < change * float_logits.abs().max(), variant
        if same is not None:
            assert (logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= same, variant
        assert tokenizer.eos_token == "</s>"


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """The weights of the model's Linear layers that torchao replaced, by layer name."""
    return {name: mod.weight for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and hasattr(mod.weight, "__tensor_flatten__")}


def test_each_variant_holds_what_its_name_says(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM

    spec = OptimizeSpec(kind="optimize", model=str(tiny_lm), quantize=["bf16", "fp16", "int8", "int4"],
                        measure={**MEASURE, "tokens": None})
    ctx = make_ctx(tmp_path, name="variants", kind="optimize")
    out = optimize.run(spec, ctx)
    assert set(out.outputs) == {"model", "bf16", "fp16", "int8", "int4"}
    for variant, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # plain transformers folders
        model = AutoModelForCausalLM.from_pretrained(ctx.out_dir / variant)
        assert model.dtype == dtype and {p.dtype for p in model.parameters()} == {dtype}

    linears = [n for n, mod in AutoModelForCausalLM.from_pretrained(tiny_lm).named_modules()
               if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    int8 = load_model(ctx.out_dir / "int8")[0]
    weights = quantized_weights(int8)
    assert sorted(weights) == sorted(linears)  # every Linear but the head
    for w in weights.values():  # int8 in memory: one byte per weight plus a scale per output row
        assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
        assert quantize.tensor_bytes(w) < 0.3 * 4 * w.numel()
    assert int8.lm_head.weight.dtype == torch.float32

    int4 = load_model(ctx.out_dir / "int4")[0]
    weights = quantized_weights(int4)
    assert sorted(weights) == sorted(linears)
    for w in weights.values():  # two weights per byte, plus a bf16 scale and zero point per group
        assert w.qdata.dtype == torch.uint8 and w.qdata.numel() == w.numel() // 2
    assert AutoModelForCausalLM.from_pretrained(ctx.out_dir / "int4").dtype == torch.bfloat16  # what is on disk


def test_a_retired_dynamic_int8_folder_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "quantization.json").write_text('{"method": "torch.ao.quantization.quantize_dynamic"}')
    with pytest.raises(ValueError, match="no longer loads; re-run the optimize step"):
        load_model(tmp_path)


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
