"""Encoder-decoders (T5, Raffel et al. 2020) in the steps that fine-tune, score and decode.

- **Fine-tuning** (finetune and constitutional, through `sft.train_sft`): the prompt is the encoder's input and
  the completion, ending with EOS, the decoder's labels; the loss covers every completion token, so no prompt
  masking is needed (a causal LM reads both in one sequence and masks the prompt). T5ForConditionalGeneration
  shifts the labels right itself to make the decoder's inputs. `max_length` bounds prompt + completion, as for
  a causal LM (`text.encode_completion`). Replay blocks of pretraining tokens become span-corruption pairs: the
  model's own pretraining objective.
- **Choice log-likelihood** (`continuation_logprob`): the decoder's summed log-probability of the choice, the
  prompt in the encoder (lm-evaluation-harness's seq2seq `loglikelihood`).
- **Held-out loss** (`heldout_scores`): T5's span corruption on a tokenize step's tokens
  (components/lib/span_corruption.py), the loss an encoder-decoder was pretrained on.
Generation needs no code of its own: `generate` starts the decoder from `decoder_start_token_id`, and
components/lib/generation.py keeps the whole decoder output (it holds no prompt).
"""

from __future__ import annotations

import torch

from components.lib import span_corruption
from components.lib.sft import SftDataModule, SftModule, SftResult
from components.lib.text import encode, encode_completion, prompt_completion
from components.lib.training import count_parameters, fit, make_trainer, perf_metrics, total_steps

IGNORE = -100


def is_seq2seq(model) -> bool:
    """Whether the model (or the peft model around it) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(encoder ids: the prompt, decoder labels: the completion ending with EOS) per row; an empty prompt is the
    EOS alone (the encoder needs one token)."""
    out = []
    for row in rows:
        prompt, completion = encode_completion(tokenizer, *prompt_completion(row, tokenizer), max_length)
        out.append((prompt or [tokenizer.eos_token_id], completion))
    return out


def replay_pairs(blocks: list[tuple[list[int], list[int]]], tokenizer, seed: int) -> list[tuple[list[int], list[int]]]:
    """Replay blocks (`sft.replay_blocks`: ids, ids) as span-corruption (inputs, targets) pairs."""
    corruption = span_corruption.for_tokenizer(tokenizer, seed)
    return [corruption.pair(ids) for ids, _ in blocks]


def padding_share(pairs: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """The share of the encoder and decoder positions of right-padded batches, in order, that are padding."""
    padded = real = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        for side in (0, 1):
            lengths = [len(p[side]) for p in chunk]
            padded, real = padded + max(lengths) * len(lengths), real + sum(lengths)
    return 1 - real / max(padded, 1)


class Seq2SeqDataModule(SftDataModule):
    """`SftDataModule` for (encoder ids, decoder labels) pairs, right-padded on both sides (never packed)."""

    def __init__(self, train: list, val: list, pad_id: int, batch_size: int = 16, seed: int = 0):
        super().__init__(train, val, pad_id, batch_size, seed)

    def _collate(self, train: bool):
        return lambda b: span_corruption.collate_pairs(b, self.hparams.pad_id)


class Seq2SeqModule(SftModule):
    """`SftModule` for an encoder-decoder: the decoder's cross-entropy on the completion tokens."""

    @staticmethod
    def inputs(batch: dict) -> dict:
        return batch

    @staticmethod
    def real_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum() + (batch["labels"] != IGNORE).sum())

    @staticmethod
    def targets(batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())  # every label is predicted: no shift, unlike a causal LM


def train_sft(ctx, model, tokenizer, train_rows: list[dict], eval_rows: list[dict], peft, loop, max_length: int,
              extra: list | None = None, packing=None):
    """`sft.train_sft` for an encoder-decoder: the same arguments, metrics and result."""
    from components.lib.datasources import Draws
    from components.lib.peft import apply_peft

    if packing is not None:
        raise ValueError("packing concatenates examples into one decoder-only sequence, and this model is an "
                         "encoder-decoder (its prompts and completions are separate sequences): set packing: false")
    if isinstance(train_rows, Draws):
        raise ValueError("an encoder-decoder is fine-tuned on loaded rows, and data is streamed: set data.stream: "
                         "false")
    train = encode_rows(train_rows, tokenizer, max_length) + replay_pairs(list(extra or []), tokenizer, ctx.seed)
    val = encode_rows(eval_rows, tokenizer, max_length)
    model = apply_peft(model, peft, tokenizer)
    trainable, total = count_parameters(model)
    print(f"{ctx.name}: encoder-decoder, peft {peft.method}: {trainable:,} trainable of {total:,} parameters "
          f"({trainable / total:.2%}); {len(train)} training and {len(val)} held-out examples", flush=True)
    mean_length = sum(len(x) + len(y) for x, y in train) / max(1, len(train))
    steps = total_steps(loop, int(loop.batch_size * loop.accumulate * mean_length))
    module = Seq2SeqModule(model, loop.optimizer.model_dump(), loop.schedule.model_dump(), steps)
    data = Seq2SeqDataModule(train, val, tokenizer.pad_token_id, loop.batch_size, ctx.seed)
    trainer = make_trainer(ctx, loop, steps, params=total, validate=bool(val))
    fit(trainer, module, datamodule=data, ctx=ctx)
    metrics = {"params/trainable": trainable, "params/total": total, "params/trainable_fraction": trainable / total,
               "train/steps": trainer.global_step, "data/padding_share": padding_share(train, loop.batch_size),
               **perf_metrics(trainer)}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k in
                    ("train/loss", "val/loss", "val/perplexity")})
    return SftResult(module.model.float(), metrics)


@torch.inference_mode()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) under an encoder-decoder: the context in the encoder (EOS alone
    when empty), the continuation the decoder's labels."""
    device = next(model.parameters()).device
    ctx_ids = torch.tensor([encode(tokenizer, context) or [tokenizer.eos_token_id]], device=device)
    cont_ids = torch.tensor([encode(tokenizer, continuation)], device=device)
    logprobs = model(input_ids=ctx_ids, labels=cont_ids).logits[0].float().log_softmax(-1)
    return float(logprobs.gather(-1, cont_ids[0, :, None]).sum())


def heldout_scores(model, tokenizer, token_dir, context: int, limit: int | None, split: str = "val",
                   batch_size: int = 8, seed: int = 0):
    """Span-corruption Scores (lib/scoring.py) on the first `limit` blocks of a tokenize step's token file, each
    block as long as an encoder input of `context` tokens needs (`span_corruption.tokens_length`)."""
    from pathlib import Path

    from components.lib.scoring import blocks
    from components.lib.tokens import read_tokens

    stream = read_tokens(Path(token_dir), split)
    if len(stream) == 0:
        raise ValueError(f"{token_dir}: the '{split}' token file is empty (for 'val': no document was held out; raise "
                         "the tokenize step's val_fraction or give it more documents)")
    token_blocks = blocks(stream, span_corruption.tokens_length(context), limit)
    return span_corruption.score_blocks(model, tokenizer, token_blocks, batch_size, seed)
