"""Apply a `peft:` section to a transformers model, and save the result as adapter and/or merged folders.

LoRA (Hu et al. 2021; rsLoRA, Kalajdzievski 2023; DoRA, Liu et al. 2024), prompt tuning (Lester et al.
2021) and IA3 (Liu et al. 2022) come from the `peft` library. BitFit (Ben Zaken et al. 2022) and
magnitude pruning (Han et al. 2015) are a few lines of torch: peft has neither. QLoRA (Dettmers et al. 2023)
is LoRA on a base that bitsandbytes holds in 4 bits (`quantized_base_kwargs`, on CUDA only).
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.lib.models import save_pretrained, save_tokenizer
from schemas.peft import PeftSpec

FEEDFORWARD_NAMES = ("down_proj", "fc2", "c_proj", "w2", "wo", "dense_4h_to_h", "fc_out")


def apply_peft(model, spec: PeftSpec, tokenizer=None):
    """Return the model ready to train under `spec`: a PeftModel for adapter methods, else `model` itself
    with requires_grad set (and, for prune, weights masked to the target sparsity)."""
    from components.lib.sequence_models import peft_problem

    if (problem := peft_problem(model, spec.method, spec.target_modules)) is not None:
        raise ValueError(problem)
    if spec.method in ("lora", "ia3", "prompt_tuning"):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if is_kbit(model):  # QLoRA: norms in float32, inputs that carry gradients, activation checkpointing
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)  # t5
        return get_peft_model(model, peft_config(spec, tokenizer, seq2seq))
    for p in model.parameters():
        p.requires_grad_(spec.method != "bitfit")
    if spec.method == "bitfit":
        chosen = [p for n, p in model.named_parameters() if is_bitfit_param(n)]
        if not chosen:
            raise ValueError("peft method 'bitfit' found no bias or norm parameters in this model")
        for p in chosen:
            p.requires_grad_(True)
    elif spec.method == "prune":
        prune_by_magnitude(model, spec.sparsity)
    return model


def peft_config(spec: PeftSpec, tokenizer=None, seq2seq: bool = False):
    """The peft config object for an adapter method (`seq2seq`: for an encoder-decoder, whose peft model passes
    the decoder's labels through)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    task = TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM

    if spec.method == "lora":
        # peft takes the shorthand only as a bare string
        targets = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
        return LoraConfig(task_type=task, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=targets, use_rslora=spec.use_rslora, use_dora=spec.use_dora)
    if spec.method == "ia3":
        ff = spec.feedforward_modules
        if spec.target_modules and ff is None:
            ff = [m for m in spec.target_modules if m.split(".")[-1] in FEEDFORWARD_NAMES]
        return IA3Config(task_type=task, target_modules=spec.target_modules, feedforward_modules=ff)
    if spec.init_text is None:
        return PromptTuningConfig(task_type=task, num_virtual_tokens=spec.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if tokenizer is None:
        raise ValueError("peft.init_text needs the tokenizer (pass tokenizer= to apply_peft)")
    return PromptTuningConfig(task_type=task, num_virtual_tokens=spec.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=spec.init_text,
                              tokenizer_name_or_path=tokenizer.name_or_path)


def quantized_base_kwargs(quant_type: str, accelerator: str) -> dict:
    """`from_pretrained` arguments that load a base in 4 bits for QLoRA: bitsandbytes' `quant_type` (nf4 or fp4)
    with double quantization (the scales quantized too) and bf16 compute, on this process's GPU."""
    if accelerator in ("cpu", "mps") or not torch.cuda.is_available():
        raise ValueError(f"peft.quantize_base: {quant_type} (QLoRA's 4-bit base, bitsandbytes) needs a CUDA GPU, "
                         f"and this step has none (accelerator {accelerator}, torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}): run it on a GPU machine, or remove quantize_base for "
                         "plain LoRA")
    try:
        import bitsandbytes  # noqa: F401 - only on this path: it needs CUDA
    except ImportError:
        raise ImportError("peft.quantize_base needs bitsandbytes: pip install bitsandbytes") from None
    import os

    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "dtype": torch.bfloat16,
            "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}  # under torchrun, each rank its own GPU


def is_kbit(model) -> bool:
    """Whether bitsandbytes holds the model's weights in 4 or 8 bits (a QLoRA base)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def is_bitfit_param(name: str) -> bool:
    """Biases and normalization weights: the parameters BitFit trains (torch's RNN/LSTM name theirs bias_ih_l0...)."""
    return name.rsplit(".", 1)[-1].startswith("bias") or "norm" in name.lower()


def prunable_linears(model) -> list[torch.nn.Linear]:
    """Every Linear layer but the output head (which, with tied embeddings, is also the input embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def prune_by_magnitude(model, sparsity: float, scope: str = "global") -> None:
    """Zero the smallest-magnitude `sparsity` of the prunable weights (L1 pruning, Han et al. 2015): across
    all layers together (`global`) or the same share in each layer (`layer`).

    The masks stay attached (weight = weight_orig * mask), so a fine-tune after pruning cannot regrow
    pruned weights; `finalize_pruning` makes them permanent before saving.
    """
    from torch.nn.utils import prune

    layers = prunable_linears(model)
    if not layers:
        raise ValueError("pruning found no linear layers to prune")
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for m in layers:
            prune.l1_unstructured(m, "weight", amount=sparsity)


def finalize_pruning(model) -> None:
    """Fold pruning masks into plain weights (a no-op for unpruned models)."""
    from torch.nn.utils import prune

    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_orig"):
            prune.remove(module, "weight")


def sparsity_of(model) -> float:
    """Share of exact zeros in the prunable linear weights."""
    weights = [m.weight.detach() for m in prunable_linears(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def save_outputs(model, tokenizer, out_dir: Path, merge: bool) -> dict[str, str]:
    """Save what training produced under out_dir and return StepOutput.outputs entries.

    Adapter methods: `adapter/` (loads with `PeftModel.from_pretrained(base, path)`), plus a merged
    standalone `model/` when `merge` (built on a copy, so `model` keeps working; on a 4-bit QLoRA base, the
    adapter merged into the full-precision base it names). Other methods: `model/`. Every folder gets the
    tokenizer.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    outputs: dict[str, str] = {}
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir / "adapter")
        save_tokenizer(tokenizer, out_dir / "adapter")
        outputs.update(adapter="adapter", tokenizer="adapter")
        if not merge:
            return outputs
        if model.peft_config[model.active_adapter].is_prompt_learning:
            raise ValueError("prompt tuning cannot be merged into a standalone model; set merge: false")
        import copy

        if is_kbit(model.get_base_model()):  # merged into 4-bit weights it would lose what it learned
            from components.lib.models import load_model

            standalone = load_model(out_dir / "adapter", dtype=torch.float32)[0]
        else:
            standalone = copy.deepcopy(model).merge_and_unload()
    else:
        finalize_pruning(model)
        standalone = model
    save_pretrained(standalone, tokenizer, out_dir / "model")
    outputs["model"] = "model"
    outputs["tokenizer"] = "model"
    return outputs
