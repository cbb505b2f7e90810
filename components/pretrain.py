"""`pretrain`: train a language model on a tokenize step's token files with a causal, masked or span-corruption
objective.

Reads: the tokenize step's `tokenizer` and `tokens` (or an existing model with `init_from`).
Writes: `model/` (a transformers folder, safetensors, with the tokenizer), `loss_curve.png`,
`curve.json`; logs train/loss, val/loss, val/perplexity, lr, tokens/s and FLOP/s to the step's run, and
the model with MLflow's transformers flavor. Objectives: next-token prediction (Radford et al. 2018)
or BERT's masked LM (Devlin et al. 2019: 15% of non-special tokens, 80% [MASK] / 10% random / 10% kept), or
T5's span corruption for an encoder-decoder (Raffel et al. 2020: 15% of the tokens dropped in spans of mean
length 3, one sentinel in place of each; components/lib/span_corruption.py).
Optional compute-optimal sizing follows Hoffmann et al. 2022 (schemas/sizing.py). Besides the transformers,
`model.family` builds the causal models before them (components/lib/sequence_models.py): Bengio et al. 2003's
fixed-window MLP, Elman's RNN (1990) and the LSTM (Hochreiter & Schmidhuber 1997).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from components.lib import models, scoring, span_corruption
from components.lib.context import StepContext, StepOutput, effort
from components.lib.text import pad_token
from components.lib.tokens import TokenDataModule
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     sum_over_ranks, total_steps, world_size)
from schemas.sizing import CHINCHILLA, read_law
from schemas.steps.pretrain import PretrainSpec

MAX_INIT_CONTEXT = 512  # block length when continuing a model whose positions allow more
# The curve file shares ctx.ckpt_dir with the checkpoints (the one folder that survives a kill).
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


class LMModule(L.LightningModule):
    """A transformers LM trained on token blocks; validation scores held-out documents (`lib.scoring`)."""

    def __init__(self, model: torch.nn.Module, objective: str = "causal", optimizer: dict | None = None,
                 schedule: dict | None = None, total_steps: int = 100, mlm_probability: float = 0.15,
                 seed: int = 0, pad_id: int = 0, tokenizer=None, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.model = model
        self.tokens_in_batch = 0
        self.scores = scoring.Scores()
        if objective == "span_corruption":  # blocks corrupted as they arrive, on the CPU (numpy, as T5's code)
            self.train_spans, self.val_spans = (span_corruption.for_tokenizer(tokenizer, s, noise_density,
                                                                              mean_noise_span_length)
                                                for s in (seed, seed + 1))
        if objective == "masked":
            self.train_collator = scoring.make_collator(tokenizer, mlm_probability, seed)
            self.val_collator = scoring.make_collator(tokenizer, mlm_probability, seed + 1)
            self.register_buffer("special_ids", torch.tensor(sorted(tokenizer.all_special_ids)), persistent=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = batch.numel()
        if self.hparams.objective == "masked":
            inputs, labels = scoring.mask_tokens(self.train_collator, batch, self.special_ids)
            loss = self.model(input_ids=inputs, labels=labels).loss
        elif self.hparams.objective == "span_corruption":
            loss = self.model(**{k: v.to(batch.device) for k, v in self.train_spans(batch).items()}).loss
        else:
            loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.scores = scoring.Scores()
        if self.hparams.objective == "masked":  # the same masks at every validation, so rounds compare
            self.val_collator.generator.manual_seed(self.hparams.seed + 1)
        if self.hparams.objective == "span_corruption":
            self.val_spans.reseed(self.hparams.seed + 1)

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.hparams.objective == "masked":
            self.scores = self.scores + scoring.masked_batch_scores(self.model, self.val_collator, batch,
                                                                    self.special_ids, self.hparams.pad_id)
        elif self.hparams.objective == "span_corruption":
            spans = {k: v.to(batch.device) for k, v in self.val_spans(batch).items()}
            self.scores = self.scores + scoring.batch_scores(self.model(**spans).logits, spans["labels"])
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            self.scores = self.scores + scoring.batch_scores(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        nll, count = sum_over_ranks(self, self.scores.nll, self.scores.count)  # each rank scored its share
        self.scores = scoring.Scores(nll, int(count))
        self.log_dict({"val/loss": self.scores.loss, "val/perplexity": self.scores.perplexity}, prog_bar=True)

    def configure_optimizers(self):
        return configure_optimizer(self.model.named_parameters(), self.hparams.optimizer or {},
                                   self.hparams.schedule or {}, self.hparams.total_steps)


class CurveRecorder(Callback):
    """Append train and validation losses to a JSONL file beside the checkpoints, so the curve survives a
    resume and a spawned DDP run (whose callbacks live in child processes)."""

    def __init__(self, path: Path, every: int = 10):
        self.path, self.every = path, every

    def _write(self, trainer, row: dict) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if trainer.global_step % self.every == 0 and loss is not None:
            self._write(trainer, {"step": trainer.global_step, "train/loss": float(loss)})

    def on_train_end(self, trainer, module) -> None:
        end = {k: float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"}
        self._write(trainer, {"step": trainer.global_step, "end": end})

    def on_validation_end(self, trainer, module) -> None:
        if "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self._write(trainer, {"step": trainer.global_step,
                                  "val/loss": float(trainer.callback_metrics["val/loss"])})


def read_curve(path: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """({"train/loss": [(step, loss)], "val/loss": [...]}, the end-of-training row), keeping the latest value
    per step (a resumed run repeats the steps between its last checkpoint and the kill)."""
    curves: dict[str, dict[int, float]] = {"train/loss": {}, "val/loss": {}}
    end: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "end" in row:
                end = {"step": row["step"], **row["end"]}
            for key in curves:
                if key in row:
                    curves[key][row["step"]] = row[key]
    return {k: sorted(v.items()) for k, v in curves.items()}, end


def record(ctx: StepContext, path: Path, step: int, loss: float) -> None:
    """Add a validation point measured outside the Trainer to the curve and to the step's run (rank 0 only:
    every rank measures it, one writes it)."""
    if not ctx.is_main:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "val/loss": loss}) + "\n")
    ctx.log_metrics({"val/loss": loss, "val/perplexity": scoring.perplexity(loss, 1)}, step=step)


@torch.no_grad()
def validation_scores(module: LMModule, data: TokenDataModule, trainer: L.Trainer) -> scoring.Scores:
    """The module's current weights on the validation windows, under the Trainer's precision (in this process,
    on every rank: each scores them all)."""
    data.setup("validate")
    module.on_validation_epoch_start()
    with models.evaluating(module), trainer.precision_plugin.val_step_context():
        for i, batch in enumerate(data.val_dataloader()):
            batch = batch.to(module.device) if torch.is_tensor(batch) else {k: v.to(module.device)
                                                                             for k, v in batch.items()}
            module.validation_step(batch, i)
    return module.scores


def plot_curve(curves: dict, path: Path, title: str) -> None:
    """Save the loss curve (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if curves[key]:
            ax.plot(*zip(*curves[key]), style, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build(spec: PretrainSpec, ctx: StepContext, tokenizer) -> tuple[torch.nn.Module, int, PretrainSpec]:
    """The model to train, its context (t5: its encoder input length), and the spec with sizing applied."""
    fitted = spec.sizing is not None and spec.sizing.constants is not None
    shape = spec.sized(read_law(ctx.step(spec.sizing.constants).path("constants")) if fitted else CHINCHILLA)
    if shape is not None:
        model_spec = spec.model.model_copy(update={"layers": shape.layers, "hidden": shape.hidden,
                                                   "heads": shape.heads, "intermediate": shape.intermediate})
        spec = spec.model_copy(update={"model": model_spec, "max_tokens": shape.tokens})
        source = f", constants fitted by '{spec.sizing.constants}'" if fitted else ""
        print(f"{ctx.name}: sizing ({shape.rule}{source}) chose layers={shape.layers} hidden={shape.hidden} "
              f"heads={shape.heads}: N={shape.params:,} non-embedding params, D={shape.tokens:,} tokens, "
              f"C={shape.flops:.3g} FLOPs", flush=True)
    if spec.objective == "span_corruption":  # the sentinels join the vocabulary before the embeddings are sized
        span_corruption.add_sentinels(tokenizer, span_corruption.sentinel_count(
            spec.model.context if spec.model is not None else MAX_INIT_CONTEXT, spec.noise_density,
            spec.mean_noise_span_length))
    if spec.model is not None:
        return models.build_model(spec.model, tokenizer, spec.objective), spec.model.context, spec
    source = ctx.model_source(spec.init_from)
    if models.is_seq2seq_model(source) != (spec.objective == "span_corruption"):
        raise ValueError(f"init_from '{spec.init_from}' is {'an' if models.is_seq2seq_model(source) else 'not an'} "
                         f"encoder-decoder, and objective '{spec.objective}' trains "
                         f"{'only those (t5)' if spec.objective == 'span_corruption' else 'a causal or masked LM'}; "
                         "choose the objective that fits the model")
    model, _ = models.load_model(source, spec.objective)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"init_from model has {model.get_input_embeddings().num_embeddings} embeddings but "
                         f"tokenizer '{spec.tokenizer}' has {len(tokenizer)} tokens; use the model's own tokenizer")
    return model, min(models.context_length(model), MAX_INIT_CONTEXT), spec


def run(spec: PretrainSpec, ctx: StepContext) -> StepOutput:
    """Build or load the model, train it on the token blocks, save and log it."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    upstream = ctx.step(spec.tokenizer)
    tokenizer = models.load_tokenizer(upstream.path("tokenizer"))
    model, context, spec = build(spec, ctx, tokenizer)
    params, _ = count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel()
    # span corruption reads longer raw blocks, whose corrupted inputs (sentinels and EOS included) fill `context`
    block = span_corruption.tokens_length(context, spec.noise_density, spec.mean_noise_span_length) \
        if spec.objective == "span_corruption" else context
    data = TokenDataModule(str(upstream.path("tokens")), context=block, batch_size=spec.batch_size,
                           val_batches=spec.val_batches, seed=ctx.seed, objective=spec.objective, tokenizer=tokenizer)
    world = world_size()
    steps = total_steps(spec.loop(), spec.batch_size * spec.accumulate * block * world)
    module = LMModule(model, spec.objective, spec.optimizer.model_dump(), spec.schedule.model_dump(), steps,
                      spec.mlm_probability, ctx.seed, pad_token(tokenizer), tokenizer, spec.noise_density,
                      spec.mean_noise_span_length)
    curve_path = ctx.ckpt_dir / "curve.jsonl"
    ctx.ckpt_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(ctx, spec.loop(), steps, params=params, callbacks=[CurveRecorder(curve_path)])
    before = validation_scores(module, data, trainer)
    record(ctx, curve_path, 0, before.loss)
    fit(trainer, module, datamodule=data, ctx=ctx,
        fixed_shapes=spec.objective in ("causal", "masked"))  # full blocks of `context` tokens
    curves, end = read_curve(curve_path)
    done = int(end.get("step", trainer.global_step))
    if not curves["val/loss"] or curves["val/loss"][-1][0] != done:
        record(ctx, curve_path, done, validation_scores(module, data, trainer).loss)
        curves, _ = read_curve(curve_path)
    final = curves["val/loss"][-1][1]

    folder = models.save_pretrained(module.model, tokenizer, ctx.out_dir / "model")
    plot_curve(curves, ctx.out_dir / "loss_curve.png", f"{ctx.name}: {spec.objective} LM, {params:,} params")
    (ctx.out_dir / "curve.json").write_text(json.dumps(curves))
    ctx.log_artifact(ctx.out_dir / "loss_curve.png")
    uri = ""
    if spec.log_model:
        from components.lib.mlflow_models import log_transformers_model

        uri = log_transformers_model(ctx, folder, task="fill-mask" if spec.objective == "masked" else "text-generation")
    tokens = done * spec.batch_size * spec.accumulate * block * world
    metrics = {"val/loss": final, "val/perplexity": scoring.perplexity(final, 1),
               "before/val/loss": before.loss, "before/val/perplexity": before.perplexity,
               "train/loss": end.get("train/loss", float("nan")), "train/steps": done, "train/tokens": tokens,
               "train/flops": 6.0 * params * tokens, "params/total": params,
               "params/non_embedding": params - embedding, **perf_metrics(trainer)}
    print(f"{ctx.name}: val perplexity {before.perplexity:.1f} -> {metrics['val/perplexity']:.2f} "
          f"after {done} steps ({tokens:,} tokens)", flush=True)
    return StepOutput(outputs={"model": "model", "tokenizer": "model"}, metrics=metrics,
                      info={"objective": spec.objective, "context": context, "model_uri": uri,
                            "curve": curves["val/loss"],
                            "effort": effort(examples=done * spec.batch_size * spec.accumulate * world,
                                             of="sequences")})
