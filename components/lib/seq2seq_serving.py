"""An encoder-decoder (T5) as an MLflow pyfunc model: text in, the decoder's generated text out.

transformers 5 dropped its `text2text-generation` pipeline, and its `text-generation` one cuts the prompt's
length off the decoder's output (which never held the prompt), so MLflow's transformers flavor cannot serve a
T5. This file is MLflow "models from code" (`mlflow.pyfunc.log_model(python_model=<this file>)`): MLflow copies
it into the logged model, so serving it needs mlflow, torch and transformers, not llmcycle. The transformers
folder itself is the model's artifact `model`, which `from_pretrained` and llmcycle's registry read as it is.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "num_beams": 1}


class Seq2SeqGenerator(PythonModel):
    """Each prompt to the encoder; the decoder's continuation, special tokens (sentinels, EOS) removed."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = context.artifacts["model"]
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder, use_safetensors=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        import torch

        prompts = _prompts(model_input)
        settings = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if k in DEFAULTS}}
        if not settings["do_sample"]:
            settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_k", "top_p")}
        batch = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**batch, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **settings)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


def _prompts(model_input) -> list[str]:
    """A string, a list of strings, or a one-column DataFrame (what MLflow passes for a string column)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):
        return [str(v) for v in model_input.iloc[:, 0].tolist()]
    return [str(v) for v in model_input]


mlflow.models.set_model(Seq2SeqGenerator())
