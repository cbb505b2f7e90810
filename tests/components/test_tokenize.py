"""The tokenize step: three algorithms, three corpus sources, loadable tokenizers, token files, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from components import tokenize
from components.lib.corpus import is_validation
from components.lib.tokens import read_tokens
from schemas.steps.tokenize import TokenizeSpec

from conftest import check_contract, make_ctx

SAMPLE = "The quick brown fox jumps over the lazy dog."


def corpus_documents(n: int) -> list[str]:
    """The first n pydoc paragraphs: real English, no blank lines inside."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for key in sorted(topics) for p in topics[key].split("\n\n"))
    good = (p for p in paragraphs if p and all(line.strip() for line in p.splitlines()))
    return [next(good) for _ in range(n)]


def run_step(tmp_path, corpus: dict, name: str = "tok", **settings):
    spec = TokenizeSpec(kind="tokenize", corpus=corpus, **{"vocab_size": 300, **settings})
    ctx = make_ctx(tmp_path, name=name, kind="tokenize")
    return spec, ctx, tokenize.run(spec, ctx)


@pytest.fixture
def text_corpus(tmp_path):
    """Forty blank-line separated documents in a .txt file, relative to the spec folder."""
    (tmp_path / "corpus.txt").write_text("\n\n".join(corpus_documents(40)) + "\n")
    return {"files": ["corpus.txt"]}


def test_bpe_on_text_files(tmp_path, text_corpus):
    spec, ctx, out = run_step(tmp_path, text_corpus, val_fraction=0.25)
    check_contract(spec, out)
    tok = AutoTokenizer.from_pretrained(ctx.out_dir / out.outputs["tokenizer"])
    assert len(tok) == out.metrics["data/vocab_size"] <= 300
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE  # byte-level BPE round-trips text exactly
    assert len(ids) < len(SAMPLE)  # it learned merges, not just bytes
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token, tok.mask_token) == \
        ("</s>", "<pad>", "</s>", "<unk>", "<mask>")  # BOS is the EOS: what training reads before a document

    folder = ctx.out_dir / out.outputs["tokens"]
    meta = json.loads((folder / "meta.json").read_text())
    train, val = read_tokens(folder, "train"), read_tokens(folder, "val")
    assert meta["dtype"] == "uint16" and train.dtype == np.uint16
    # split by document: each document ends with EOS, the val documents are the hashed ones
    docs = corpus_documents(40)
    held_out = [i for i in range(40) if is_validation(i, 0, 0.25)]
    assert 0 < len(held_out) < 40
    assert out.metrics["val/documents"] == len(held_out) == int((val == tok.eos_token_id).sum())
    assert out.metrics["train/documents"] == 40 - len(held_out) == int((train == tok.eos_token_id).sum())
    first_val = val[: list(val).index(tok.eos_token_id)]
    assert tok.decode(first_val) == docs[held_out[0]] + "\n"  # a .txt document keeps its last newline
    assert out.metrics["train/tokens"] == len(train) and out.metrics["val/tokens"] == len(val)
    chars = sum(len(d) + 1 for i, d in enumerate(docs) if i not in held_out)
    assert out.metrics["data/chars_per_token"] == pytest.approx(chars / len(train))
    assert 1.2 < out.metrics["data/chars_per_token"] < 4  # English and code with a 300-token vocabulary


def test_tokenizer_trains_on_training_documents_only(tmp_path):
    docs = [f"common words here {i}" for i in range(30)]
    held_out = [i for i in range(30) if is_validation(i, 0, 0.3)]
    for i in held_out:
        docs[i] = "zyzzyva " * 20  # seen only in validation: must not become a token
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    _, ctx, out = run_step(tmp_path, {"files": ["c.txt"]}, val_fraction=0.3, vocab_size=400, min_frequency=1)
    vocab = AutoTokenizer.from_pretrained(ctx.out_dir / "tokenizer").get_vocab()
    assert not any("zyzzyva" in token for token in vocab)
    assert any("common" in token for token in vocab)


@pytest.mark.parametrize("algorithm", ["unigram", "wordpiece"])
def test_other_algorithms_load_and_round_trip(tmp_path, text_corpus, algorithm):
    _, ctx, out = run_step(tmp_path, text_corpus, algorithm=algorithm, lowercase=True)
    tok = AutoTokenizer.from_pretrained(ctx.out_dir / "tokenizer")
    text = "the value of the function is returned"  # words the pydoc paragraphs use
    ids = tok(text.upper(), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text  # lowercased, and words come back whole
    assert read_tokens(ctx.out_dir / "tokens", "train").dtype == np.uint16


def test_jsonl_with_text_field(tmp_path):
    rows = [{"id": i, "body": doc} for i, doc in enumerate(corpus_documents(20))]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, _, out = run_step(tmp_path, {"files": ["data/*.jsonl"], "text_field": "body"}, val_fraction=0)
    assert (out.metrics["train/documents"], out.metrics["val/documents"]) == (20, 0)


def test_jsonl_without_the_field_names_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: row has no 'text' field .*got body"):
        run_step(tmp_path, {"files": ["a.jsonl"]})


def test_missing_files_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.files: no file matches 'nowhere/\\*.txt'"):
        run_step(tmp_path, {"files": ["nowhere/*.txt"]})


def test_datasets_json_source_relative_to_the_spec(tmp_path, monkeypatch):
    (tmp_path / "rows.json").write_text("\n".join(json.dumps({"content": d}) for d in corpus_documents(25)))
    monkeypatch.chdir(tmp_path.parent)  # data_files are resolved against the spec folder, not the cwd
    source = {"dataset": {"path": "json", "data_files": ["rows.json"], "text_field": "content"}}
    _, _, out = run_step(tmp_path, source, val_fraction=0)
    assert out.metrics["train/documents"] == 25


def test_datasets_saved_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": corpus_documents(15)}).save_to_disk(str(tmp_path / "saved"))
    _, _, out = run_step(tmp_path, {"dataset": {"path": "saved"}}, val_fraction=0)
    assert out.metrics["train/documents"] == 15
    with pytest.raises(ValueError, match="no 'body' column"):
        run_step(tmp_path, {"dataset": {"path": "saved", "text_field": "body"}}, name="again")
