"""`tokenize`: learn a tokenizer and encode the corpus into flat token files.

Reads: a corpus (pydoc topics, .txt/.jsonl files, or a `datasets` source), streamed document by
document. Writes: `tokenizer/` (loads with `transformers.AutoTokenizer.from_pretrained`), and
`tokens/{train,val}.bin` (numpy memmaps of token ids, each document followed by EOS) with
`tokens/meta.json`. Logs: vocabulary size, documents and tokens per split, characters per token.
Algorithms: byte-level BPE (Sennrich et al. 2016; GPT-2), Unigram (Kudo 2018), WordPiece (BERT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.lib.context import StepContext, StepOutput, effort
from components.lib.corpus import is_validation, iter_documents
from components.lib.io import write_json_atomic
from components.lib.models import save_tokenizer
from schemas.steps.tokenize import TokenizeSpec

# `</s>` ends every document and is also the BOS: the token training reads before each document, so the
# start of a text is what the model saw there (components/lib/text.py: the convention).
SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
ENCODE_BATCH = 512  # documents per encode_batch call: enough for the Rust side to use every core


def build_tokenizer(spec: TokenizeSpec):
    """An untrained `tokenizers` pipeline and its trainer for the chosen algorithm."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(SPECIALS.values()))
    if spec.algorithm == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif spec.algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=spec.vocab_size, special_tokens=specials,
                                          unk_token=SPECIALS["unk_token"], show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token=SPECIALS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                            special_tokens=specials, show_progress=False)
    norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    return tok, trainer


def train_tokenizer(spec: TokenizeSpec, ctx: StepContext, folder: Path):
    """Train on the training documents only and save a transformers tokenizer folder."""
    from transformers import PreTrainedTokenizerFast

    tok, trainer = build_tokenizer(spec)
    docs = (d for i, d in enumerate(iter_documents(spec.corpus, ctx.resolve_path))
            if not is_validation(i, ctx.seed, spec.val_fraction))
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["eos_token"], **SPECIALS,
                                   clean_up_tokenization_spaces=False)
    save_tokenizer(fast, folder)
    return fast


def encode_corpus(tokenizer, spec: TokenizeSpec, ctx: StepContext, folder: Path) -> dict:
    """Stream documents through `encode_batch` into train.bin / val.bin; return per-split counts."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    stats = {split: {"documents": 0, "tokens": 0, "characters": 0} for split in ("train", "val")}
    files = {split: open(folder / f"{split}.bin", "wb") for split in stats}
    try:
        pending: dict[str, list[str]] = {"train": [], "val": []}
        for i, doc in enumerate(iter_documents(spec.corpus, ctx.resolve_path)):
            split = "val" if is_validation(i, ctx.seed, spec.val_fraction) else "train"
            pending[split].append(doc)
            if len(pending[split]) >= ENCODE_BATCH:
                _flush(backend, pending[split], files[split], stats[split], eos, dtype)
        for split in stats:
            _flush(backend, pending[split], files[split], stats[split], eos, dtype)
    finally:
        for fh in files.values():
            fh.close()
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": len(tokenizer), "eos_token_id": eos, "splits": stats}
    write_json_atomic(folder / "meta.json", meta)
    return meta


def _flush(backend, docs: list[str], fh, stats: dict, eos: int, dtype) -> None:
    if not docs:
        return
    # encode_batch_fast skips the character offsets token files never use; one array and one write
    # per batch keeps Python's per-document work to a list append.
    ids: list[int] = []
    for enc in backend.encode_batch_fast(docs, add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    np.asarray(ids, dtype=dtype).tofile(fh)
    stats["tokens"] += len(ids)
    stats["documents"] += len(docs)
    stats["characters"] += sum(len(d) for d in docs)
    docs.clear()


def run(spec: TokenizeSpec, ctx: StepContext) -> StepOutput:
    """Train the tokenizer, encode the corpus, log the compression figures."""
    tokenizer = train_tokenizer(spec, ctx, ctx.out_dir / "tokenizer")
    meta = encode_corpus(tokenizer, spec, ctx, ctx.out_dir / "tokens")
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if train["tokens"] == 0:
        raise ValueError("corpus has no training documents; check corpus and val_fraction")
    metrics = {
        "data/vocab_size": meta["vocab_size"],
        "train/documents": train["documents"], "val/documents": val["documents"],
        "train/tokens": train["tokens"], "val/tokens": val["tokens"],
        "data/chars_per_token": train["characters"] / max(train["tokens"], 1),
    }
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.out_dir / "tokenizer", "tokenizer")
    print(f"{ctx.name}: {meta['vocab_size']} tokens in the vocabulary; train {train['tokens']:,} tokens "
          f"({train['documents']} docs), val {val['tokens']:,} tokens ({val['documents']} docs); "
          f"{metrics['data/chars_per_token']:.2f} characters per token")
    return StepOutput(outputs={"tokenizer": "tokenizer", "tokens": "tokens"}, metrics=metrics,
                      info={"dtype": meta["dtype"], "vocab_size": meta["vocab_size"],
                            "effort": effort(examples=train["documents"] + val["documents"], of="documents",
                                             tokens=train["tokens"] + val["tokens"])})
