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
