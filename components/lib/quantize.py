"""Int8 dynamic quantization of a model's Linear layers, saved and loaded as a folder.

torch.ao's `quantize_dynamic`: int8 weights, activations quantized per batch at run time. safetensors cannot
hold packed int8 weights, so the folder holds the config, the tokenizer, the quantized state dict
(`model_int8.pt`) and `quantization.json`; `load_quantized` rebuilds the float model from the config,
quantizes it the same way and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INT8_FILE = "model_int8.pt"
QUANT_FILE = "quantization.json"


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / QUANT_FILE).is_file()


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear layer: int8 weights, activations quantized per batch at run time."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def save_quantized(qmodel, tokenizer, folder: Path) -> Path:
    """Save a dynamically quantized model: safetensors cannot hold packed int8 weights, so a state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    from components.lib.models import save_tokenizer

    qmodel.config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    torch.save(qmodel.state_dict(), folder / INT8_FILE)
    (folder / QUANT_FILE).write_text(json.dumps({
        "method": "torch.ao.quantization.quantize_dynamic", "dtype": "qint8", "modules": ["torch.nn.Linear"],
        "load": "components.lib.quantize.load_quantized(folder)", "torch": torch.__version__}, indent=2))
    return folder


def load_quantized(folder: str | Path):
    """Load a `quantized/` folder: rebuild the float model from its config, quantize it, load the int8 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.lib.models import load_tokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    qmodel = quantize_int8(model.eval())
    qmodel.load_state_dict(torch.load(folder / INT8_FILE, weights_only=True))
    return qmodel.eval(), load_tokenizer(str(folder))
