"""Saved artifacts load with every transformers version pyproject.toml admits: checked with the oldest, 4.46.

A fresh environment with transformers 4.46 (and the tokenizers it pins, no torch: loading a tokenizer needs
none) loads the tokenizer a tokenize step saves and encodes text to the same ids as the transformers here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from components.lib.models import load_model

REPO = Path(__file__).resolve().parents[3]
SAMPLE = "The for statement iterates over a sequence:\n    for x in items: print(x)  # </s> ünïcödé"


def oldest_transformers() -> str:
    """The lowest transformers version pyproject.toml admits."""
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"transformers>=([0-9.]+)"', text).group(1)


@pytest.fixture(scope="module")
def old_python(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("old-transformers") / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                          f"transformers=={oldest_transformers()}.*"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return python


@pytest.mark.slow
def test_saved_tokenizer_loads_in_the_oldest_transformers_and_gives_the_same_ids(old_python, tokenized, tmp_path):
    from components.lib.models import load_tokenizer, save_tokenizer

    folder = tokenized.path("tokenizer")
    again = tmp_path / "resaved"  # what every later step writes: a loaded tokenizer saved again
    save_tokenizer(load_tokenizer(folder), again)
    ours = load_tokenizer(folder)(SAMPLE, add_special_tokens=False)["input_ids"]
    code = ("import json, sys, transformers; from transformers import AutoTokenizer; "
            "out = {}\nfor f in sys.argv[1:]:\n    t = AutoTokenizer.from_pretrained(f)\n"
            f"    out[f] = [type(t).__name__, t.bos_token, t.eos_token, t({SAMPLE!r}, add_special_tokens=False)"
            "['input_ids']]\nprint(transformers.__version__, json.dumps(out))")
    run = subprocess.run([str(old_python), "-c", code, str(folder), str(again)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    version, found = run.stdout.strip().split(" ", 1)
    assert version.startswith(oldest_transformers())
    for name, bos, eos, ids in json.loads(found).values():
        assert (name, bos, eos) == ("PreTrainedTokenizerFast", "</s>", "</s>")
        assert ids == ours


def test_a_model_that_ships_its_own_code_loads_only_when_the_spec_trusts_it(tiny_lm, tmp_path, monkeypatch):
    import shutil

    from components.lib.models import TRUSTED_ENV

    folder = tmp_path / "remote"
    shutil.copytree(tiny_lm, folder)
    (folder / "my_config.py").write_text("from transformers import LlamaConfig\n\n\n"
                                         "class MyConfig(LlamaConfig):\n    model_type = 'my_llama'\n")
    (folder / "my_model.py").write_text("from transformers import LlamaForCausalLM\n\nfrom .my_config import MyConfig\n"
                                        "\n\nclass MyModel(LlamaForCausalLM):\n    config_class = MyConfig\n"
                                        "    shipped = True\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_llama", architectures=["MyModel"],
                  auto_map={"AutoConfig": "my_config.MyConfig", "AutoModelForCausalLM": "my_model.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ships its own Python code .* under `trust_remote_code:` at the top"):
        load_model(folder)
    monkeypatch.setenv(TRUSTED_ENV, json.dumps([str(folder)]))  # what the engine sets from the spec's list
    model, _ = load_model(folder)
    assert type(model).__name__ == "MyModel" and model.shipped


def test_pickled_weights_are_refused_safetensors_load(tiny_lm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"  # the layout of an older checkpoint: config, pickled weights, tokenizer
    folder.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict(), folder / "pytorch_model.bin")
    for f in [*tiny_lm.glob("tokenizer*"), tiny_lm / "config.json"]:
        (folder / f.name).write_bytes(f.read_bytes())
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ValueError, match="no .safetensors weights; llmcycle loads weights only from safetensors"):
        load_model(folder)
    model, _ = load_model(tiny_lm)
    assert model.config.num_hidden_layers == 2


def test_the_spec_names_the_models_whose_code_may_run(tmp_path, monkeypatch):
    import schemas
    from components.lib.models import TRUSTED_ENV, trusts_code
    from flows.step import _trust_code

    spec = tmp_path / "spec.yaml"
    body = "name: t\n{trust}steps:\n  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}}}\n"
    spec.write_text(body.format(trust="trust_remote_code: [hf:org/model, ./models/x]\n"))
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    assert not trusts_code("org/model")
    _trust_code(schemas.load(spec))
    assert trusts_code("org/model") and trusts_code(tmp_path / "models" / "x") and not trusts_code("org/other")
    spec.write_text(body.format(trust="trust_remote_code: [tok]\n"))
    with pytest.raises(schemas.SpecError, match="trust_remote_code"):
        schemas.load(spec)
