"""QLoRA's `peft.quantize_base`: a finetune LoRA setting, refused before anything runs where it cannot work."""

from __future__ import annotations

import pytest

import schemas

SPEC = """\
name: qlora
trainer: {accelerator: cpu}
steps:
  sft:
    kind: finetune
    model: ./base
    data: {builtin: tasks}
    peft: {method: lora, r: 8, quantize_base: nf4}
"""


def problems(write_spec, text: str) -> list[str]:
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(write_spec(text))
    return [str(p).split(": ", 1)[1] for p in err.value.problems]


def test_a_4bit_base_on_the_cpu_is_a_spec_error_at_the_field(write_spec):
    path = write_spec(SPEC)
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(path)
    [problem] = err.value.problems
    assert str(problem).startswith(f"{path}:8:47: steps.sft.peft.quantize_base: quantize_base: nf4 (QLoRA's 4-bit "
                                   "base, bitsandbytes) needs a CUDA GPU, and this step runs on accelerator 'cpu'")
    assert "remove quantize_base for plain LoRA" in str(problem)
    # the step's own trainer decides, over the pipeline's
    gpu_step = SPEC.replace("    data: {builtin: tasks}\n",
                            "    data: {builtin: tasks}\n    trainer: {accelerator: gpu}\n")
    assert schemas.load(write_spec(gpu_step)).spec.steps["sft"].peft.quantize_base == "nf4"
    assert schemas.load(write_spec(SPEC.replace("accelerator: cpu", "accelerator: auto")))  # decided at step start
    fsdp = SPEC.replace("accelerator: cpu", "accelerator: gpu, strategy: fsdp")
    assert problems(write_spec, fsdp) == ["steps.sft.peft.quantize_base: quantize_base (QLoRA) trains with one GPU "
                                          "per process (ddp), got strategy 'fsdp'; use ddp or a single device"]


def test_quantize_base_belongs_to_finetune_lora_only(write_spec):
    ia3 = SPEC.replace("{method: lora, r: 8, quantize_base: nf4}", "{method: ia3, quantize_base: nf4}")
    assert problems(write_spec, ia3) == ["steps.sft.peft: peft method 'ia3' takes no quantize_base (quantize_base "
                                         "belongs to lora)"]
    dpo = SPEC.replace("kind: finetune", "kind: dpo").replace("{builtin: tasks}", "{builtin: preferences}")
    [message] = problems(write_spec, dpo)
    assert message.startswith("steps.sft.peft: quantize_base (QLoRA's 4-bit base) is a finetune setting")
    bad = problems(write_spec, SPEC.replace("quantize_base: nf4", "quantize_base: int4"))
    assert bad == ["steps.sft.peft.quantize_base: Input should be 'nf4' or 'fp4', got \"int4\""]
