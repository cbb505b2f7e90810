"""Lower-precision copies of a causal LM, written as folders that `models.load_model` loads like any other model.

- `bf16`, `fp16`: the whole model cast to that dtype; a plain transformers folder (`config.json` names the dtype).
- `int8`: torchao's `Int8WeightOnlyConfig` (symmetric int8 weights with one scale per output channel, float32
  activations) on every Linear but the LM head, applied and saved by transformers' own `TorchAoConfig`: the
  safetensors file holds the int8 data and the scales, `config.json` the quantization, so plain
  `AutoModelForCausalLM.from_pretrained` loads it (with torchao installed).
- `int4`: int4 weights in groups of `group_size` along the input with a bf16 scale and zero point per group, bf16
  activations (A16W4), on PyTorch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`): torchao 0.18's
  `PrototypeInt4WeightOnlyConfig`. (Its stable `Int4WeightOnlyConfig` needs CUDA-only kernels.) torchao cannot
  write that packed layout to safetensors yet, so the folder holds the bf16 weights plus `quantization.json`,
  and `load_model` quantizes them as it loads: the same weights always give the same int4 model. On disk it is
  the bf16 size; in memory (`weight_bytes`) about a quarter of that. Plain `from_pretrained` gives the bf16 model.

No pickles: weights are safetensors only; torchao's tensors are rebuilt from safetensors metadata (its allowlist).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

VARIANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_FILE = "quantization.json"
INT4_METHOD = "torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig"
INT4_GROUP_SIZES = (128, 64, 32)  # the group sizes the int4 CPU kernel takes, largest (fewest scales) first
RETIRED = "torch.ao.quantization.quantize_dynamic"  # the dynamic int8 folders (`model_int8.pt`) of earlier versions


def import_torchao():
    """Import torchao without its start-up warnings about CUDA extensions a CPU build cannot load."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401 - what transformers loads int8 with
    except ImportError:
        raise ImportError("quantizing to int8 or int4 needs torchao: pip install torchao") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao


def save_variant(float_folder: Path, variant: str, folder: Path) -> Path:
    """Write `variant` (bf16, fp16, int8, int4) of the float model saved in `float_folder` to `folder`."""
    from transformers import TorchAoConfig

    from components.lib.models import load_model, save_pretrained

    if variant in VARIANT_DTYPES:
        model, tokenizer = load_model(float_folder, dtype=VARIANT_DTYPES[variant])
    elif variant == "int8":
        import_torchao()
        from torchao.quantization import Int8WeightOnlyConfig

        model, tokenizer = load_model(float_folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    elif variant == "int4":
        model, tokenizer = load_model(float_folder, dtype=torch.bfloat16)
        save_pretrained(model, tokenizer, folder)
        recipe = {"method": INT4_METHOD, "group_size": int4_group_size(model), "activations": "bfloat16",
                  "skip": ["lm_head"], "torchao": import_torchao().__version__,
                  "load": "components.lib.models.load_model(folder): bf16 weights quantized to int4 as they load"}
        (folder / QUANT_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        return folder
    else:
        raise ValueError(f"quantize: unknown variant '{variant}'; expected one of bf16, fp16, int8, int4")
    return save_pretrained(model, tokenizer, folder)


def saved_quantization(folder: str | Path) -> dict | None:
    """The `quantization.json` recipe of a folder whose weights are quantized as they load (None: no such file)."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    recipe = json.loads(path.read_text())
    if recipe.get("method") == RETIRED:
        raise ValueError(f"{folder}: this folder holds torch.ao dynamic int8 weights (model_int8.pt), a format "
                         "llmcycle no longer loads; re-run the optimize step that wrote it (int8 is now torchao's "
                         "weight-only int8 in safetensors)")
    if recipe.get("method") != INT4_METHOD:
        raise ValueError(f"{path}: unknown quantization method {recipe.get('method')!r}; expected {INT4_METHOD}")
    return recipe


def apply_saved(model, recipe: dict):
    """Quantize a model loaded from a folder with a `quantization.json` as the recipe says (int4)."""
    return quantize_int4(model, recipe["group_size"])


def int4_group_size(model) -> int:
    """The largest group size the int4 kernel takes that divides the input width of every layer to quantize."""
    widths = {m.in_features for m in _quantizable(model).values()}
    for size in INT4_GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"quantize: int4 needs every Linear input width to be a multiple of 32; this model has "
                     f"{sorted(widths)}: use int8 or bf16 for it")


def quantize_int4(model, group_size: int):
    """int4 weight-only quantization of every Linear but the LM head, in place (bf16 activations)."""
    import_torchao()
    from torchao.quantization import quantize_

    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    except ImportError:
        raise ImportError(f"int4 on CPU needs torchao >= 0.18 (PrototypeInt4WeightOnlyConfig); found "
                          f"{import_torchao().__version__}: pip install -U torchao") from None
    chosen = _quantizable(model)
    quantize_(model.to(torch.bfloat16), PrototypeInt4WeightOnlyConfig(group_size=group_size),
              filter_fn=lambda module, name: name in chosen)
    return model


def _quantizable(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers quantization replaces: all but the output head (kept in float, as TorchAoConfig does)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers in memory, a torchao tensor counted by the tensors it holds
    (int8 or packed int4 data, scales, zero points); tied weights once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory (a tensor subclass: the sum over the tensors inside it)."""
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass: its inner tensors hold the data
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
