"""`finetune`: supervised fine-tuning of a causal LM, fully or parameter-efficiently, with a forgetting report.

Reads: a model (step, `hf:`, path or `models:/`), instruction data (JSONL in TRL's formats, the builtin
task mixture, or another step's `sft.jsonl`), and optionally a `tokenize` step's token files (replay and
the forgetting perplexity). Trains with the loss on completion tokens only (as TRL's SFTTrainer with
completion-only loss). Writes: `adapter/` (peft methods; `PeftModel.from_pretrained(base, path)`),
`model/` (merged standalone transformers folder with tokenizer), `metrics.json`, and logs the merged
model, the per-example predictions and the base-vs-tuned scores to MLflow.
Methods: LoRA (Hu et al. 2021), prompt tuning (Lester et al. 2021), IA3 (Liu et al. 2022), BitFit (Ben
Zaken et al. 2022), magnitude pruning (Han et al. 2015); task mixtures against forgetting (FLAN, Wei et
al. 2022).
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch

from components.context import StepContext, StepOutput, write_json_atomic
from components.peft_methods import apply_peft, save_outputs, sparsity_of
from components.sft import SftDataModule, encode_rows, load_rows, mean_length, replay_blocks, to_prompt_completion
from components.training import configure_optimizer, count_parameters, fit, make_trainer, total_steps
from schemas.base import OptimizerSpec, ScheduleSpec
from schemas.steps.finetune import FinetuneSpec


class SftModule(L.LightningModule):
    """Next-token loss on completion tokens (labels are -100 elsewhere) of a transformers/peft model."""

    def __init__(self, model: torch.nn.Module, optimizer: dict | None = None, schedule: dict | None = None,
                 steps: int = 100):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.tokens_in_batch = 0
        self._val_sum, self._val_count = 0.0, 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = int(batch["attention_mask"].sum())
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model(**batch).loss
        targets = int((batch["labels"][:, 1:] != -100).sum())
        self._val_sum, self._val_count = self._val_sum + float(loss) * targets, self._val_count + targets
        self.log("val/loss", loss, prog_bar=True, batch_size=targets)

    def on_validation_epoch_end(self) -> None:
        if self._val_count:
            self.log("val/perplexity", math.exp(min(self._val_sum / self._val_count, 50.0)))
        self._val_sum, self._val_count = 0.0, 0

    def configure_optimizers(self) -> dict:
        return configure_optimizer(self.model.named_parameters(), OptimizerSpec(**(self.hparams.optimizer or {})),
                                   ScheduleSpec(**(self.hparams.schedule or {})), self.hparams.steps)


def run(spec: FinetuneSpec, ctx: StepContext) -> StepOutput:
    """Fine-tune `spec.model` on `spec.data` and report base vs tuned scores."""
    train_rows, eval_rows = load_rows(spec.data, ctx)
    return train_sft(ctx, spec, ctx.model_source(spec.model), train_rows, eval_rows)


def train_sft(ctx: StepContext, spec: FinetuneSpec, model_source: str, train_rows: list[dict],
              eval_rows: list[dict]) -> StepOutput:
    """Fine-tune the model at `model_source` on rows you already hold; write and log as the step does.

    Rows are `{prompt, completion}` (optionally `task`, `answer`) or `{messages}`; `eval_rows` are held out
    (validation loss and the task scores). Uses every other setting of `spec` (peft, optimizer, budget,
    replay, merge, evaluation; `spec.data` is not read). Returns the StepOutput with outputs `adapter`
    (peft methods), `model` and `tokenizer` (when merged or a non-adapter method) and `metrics`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    L.seed_everything(ctx.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_source, dtype=torch.float32)
    train = encode_rows(train_rows, tokenizer, spec.data.max_length)
    val = encode_rows(eval_rows, tokenizer, spec.data.max_length)
    token_dir = str(ctx.step(spec.tokens).path("tokens")) if spec.tokens else None
    if spec.replay:
        count = round(len(train) * spec.replay / (1 - spec.replay))
        train += replay_blocks(token_dir, count, min(spec.data.max_length, 128), ctx.seed)
    scored = [dict(zip(("prompt", "completion"), to_prompt_completion(r, tokenizer)), task=r.get("task", "data"),
                   **({"answer": r["answer"]} if "answer" in r else {})) for r in eval_rows]
    shot_rows = [r for r in train_rows if "prompt" in r]

    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    ev = spec.evaluation
    if ev is not None and ev.base and scored:
        m, p = _score(model, tokenizer, scored, "base", spec, shot_rows, token_dir, ctx.seed)
        metrics.update(m)
        predictions += p

    model = apply_peft(model, spec.peft, tokenizer)
    trainable, total = count_parameters(model)
    metrics.update({"params/trainable": trainable, "params/total": total, "params/trainable_fraction": trainable / total})
    print(f"{ctx.name}: peft {spec.peft.method}: {trainable:,} trainable of {total:,} parameters "
          f"({trainable / total:.2%}); {len(train)} training and {len(val)} held-out examples", flush=True)

    steps = total_steps(spec, int(spec.batch_size * spec.accumulate * mean_length(train)))
    module = SftModule(model, spec.optimizer.model_dump(), spec.schedule.model_dump(), steps)
    data = SftDataModule(train, val, tokenizer.pad_token_id, spec.batch_size, ctx.seed)
    trainer = make_trainer(ctx, spec, steps, params=total, validate=bool(val))
    started = time.perf_counter()
    fit(trainer, module, datamodule=data, ctx=ctx)
    metrics["time/train_seconds"] = time.perf_counter() - started
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "perf/"))})
    metrics["train/steps"] = trainer.global_step
    model = module.model.float()

    if ev is not None and scored:
        m, p = _score(model, tokenizer, scored, "tuned", spec, shot_rows, token_dir, ctx.seed)
        metrics.update(m)
        predictions += p
        from components.task_eval import forgetting_deltas

        metrics.update(forgetting_deltas(metrics))
    if spec.peft.method == "prune":
        metrics["prune/sparsity"] = sparsity_of(model)
    outputs = save_outputs(model, tokenizer, ctx.out_dir, spec.merged)
    write_json_atomic(ctx.out_dir / "metrics.json", metrics)
    outputs["metrics"] = "metrics.json"
    _log(ctx, outputs, predictions, spec.peft.method)
    info = {"base_model": model_source, "peft_method": spec.peft.method, "trainable_params": trainable,
            "total_params": total}
    return StepOutput(outputs=outputs, metrics=metrics, info=info)


def _score(model, tokenizer, rows, label, spec, shot_rows, token_dir, seed):
    from components.task_eval import score_model

    ev = spec.evaluation
    shots = (0, ev.shots) if ev.shots else (0,)
    reserve = spec.peft.num_virtual_tokens if spec.peft.method == "prompt_tuning" else 0
    started = time.perf_counter()
    metrics, predictions = score_model(model, tokenizer, rows, label, shots, shot_rows, token_dir,
                                       ev.perplexity_batches, ev.max_new_tokens, seed, reserve)
    summary = " ".join(f"{k.split('/')[-2]}={v:.3f}" for k, v in metrics.items() if k.endswith("/accuracy"))
    print(f"{label}: task accuracy {summary} ({time.perf_counter() - started:.0f}s)", flush=True)
    return metrics, predictions


def _log(ctx: StepContext, outputs: dict[str, str], predictions: list[dict], method: str) -> None:
    """Log the merged model (transformers flavor), the adapter and the predictions to the step's run."""
    if ctx.run_id is None:
        return
    if predictions:
        ctx.log_table(predictions, "task_predictions.json")
    if "adapter" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["adapter"], "adapter")
    if "model" in outputs:
        try:
            from components.mlflow_models import log_transformers_model
        except ImportError:  # older checkouts without the MLflow model helper
            ctx.log_artifact(ctx.out_dir / outputs["model"], "model")
        else:
            log_transformers_model(ctx, ctx.out_dir / outputs["model"])
    ctx.log_artifact(ctx.out_dir / "metrics.json")
    ctx.set_tags({"llmcycle.peft_method": method})
