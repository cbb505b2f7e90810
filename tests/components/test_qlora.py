"""QLoRA in finetune: LoRA on a bitsandbytes 4-bit base on CUDA; a clear error before any training elsewhere."""

from __future__ import annotations

import pytest
import torch

from components import finetune
from tests.components.test_finetune import completion_loss, spec_of
from tests.conftest import check_contract, finish, make_ctx

DATA = {"builtin": "tasks", "tasks": ["copy", "sentiment"], "n_per_task": 32, "eval_per_task": 4}
QLORA = {"method": "lora", "r": 8, "target_modules": ["all-linear"], "quantize_base": "nf4"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_qlora_fails_before_training_naming_the_field(tmp_path, tiny_lm):
    ctx = make_ctx(tmp_path, name="qlora", kind="finetune", trainer={"accelerator": "auto"})
    with pytest.raises(ValueError, match=r"^peft.quantize_base: nf4 \(QLoRA's 4-bit base, bitsandbytes\) needs a "
                                         r"CUDA GPU, and this step has none .*remove quantize_base for plain LoRA$"):
        finetune.run(spec_of(model=str(tiny_lm), data=DATA, peft=QLORA), ctx)
    assert not any(ctx.out_dir.iterdir()) and not ctx.ckpt_dir.exists()  # nothing loaded, trained or written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_lora_on_a_4bit_base_and_the_adapter_loads_in_plain_peft(tmp_path, tiny_lm):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = make_ctx(tmp_path, name="qlora", kind="finetune", trainer={"accelerator": "gpu", "precision": "bf16-mixed"})
    spec = spec_of(model=str(tiny_lm), data=DATA, peft=QLORA, evaluation=None, max_steps=30)
    out = finetune.run(spec, ctx)
    check_contract(spec, out)
    result = finish(ctx, out)

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    before = completion_loss(base, tok)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), result.path("adapter")).eval()
    assert completion_loss(adapted, tok) < before - 0.1  # learned on the 4-bit base, it helps the float one
    merged = AutoModelForCausalLM.from_pretrained(result.path("model")).eval()  # merged into the float base
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-4, rtol=1e-4)
