"""`distill`: train a small causal student on a frozen teacher's next-token distributions.

Reads: the teacher model, the student (a new architecture built on the tokenize step's tokenizer, or a model
reference), and the tokenize step's token files: training blocks for both students, the held-out documents for
the report. Writes: `model/` (the distilled student, a transformers folder with safetensors and the tokenizer),
`report.json`; logs the losses, the side-by-side report (teacher, distilled student, hard-label twin: held-out
perplexity, parameters, size, latency) as metrics and a table, and the student with MLflow's transformers flavor.

Loss (Hinton et al. 2015, arXiv 1503.02531): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE. With
`on_policy`, each micro-batch is, with probability lmbda, a continuation the student samples after a prompt cut
from the block, scored with the generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, arXiv
2306.13649; TRL's GKDTrainer). The hard-label twin starts from the same weights and trains on the same blocks
for the same steps with the cross-entropy alone, so the report isolates what the teacher added. Teacher and
student must share the tokenize step's tokenizer: a spec error where the pipeline shows it (schemas/contracts.py),
else checked here, vocabulary against vocabulary, before training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil

import lightning as L
import torch
import torch.nn.functional as F

from components.lib import models, scoring, serving
from components.lib.context import StepContext, StepOutput, effort
from components.lib.text import pad_token
from components.lib.tokens import TokenDataModule
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     sum_over_ranks, total_steps, world_size)
from schemas.steps.distill import DistillSpec

MAX_CONTEXT = 512  # block length when the student is an existing model whose positions allow more
IGNORE = scoring.IGNORE


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    beta: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of the temperature-T distributions, summed over the vocabulary and
    averaged over the positions in `mask` (all when None).

    JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M), M = beta P_T + (1 - beta) P_S (GKD, Agarwal et al.
    2024, Eq. 1, P_T the teacher), where beta = 0 means KL(P_T || P_S) (forward, Hinton's term) and beta = 1
    means KL(P_S || P_T) (reverse): TRL's `GKDTrainer.generalized_jsd_loss` with labels (its batchmean).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        per = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        per = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        per = beta * F.kl_div(m, t, reduction="none", log_target=True).sum(-1) + \
            (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    if mask is None:
        return per.mean()
    return (per * mask).sum() / mask.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5, beta: float = 0.0,
                      hard_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, soft, hard) per predicted token: loss = alpha * T^2 * soft + (1 - alpha) * hard (Hinton et al. 2015;
    the T^2 keeps the soft gradients' size as T changes, their §2).

    soft = `generalized_jsd` at temperature T (beta 0: KL(teacher_T || student_T)); hard = cross-entropy of the
    labels under the student at T = 1. Logits and labels are aligned; labels of -100 are not scored.
    `hard_labels=False` (tokens the student sampled itself, GKD): the loss is the soft term alone, alpha * T^2 * soft.
    """
    mask = labels != IGNORE
    soft = generalized_jsd(student_logits, teacher_logits, mask, beta, temperature)
    hard = F.cross_entropy(student_logits[mask].float(), labels[mask]) if hard_labels and mask.any() \
        else soft.new_zeros(())
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard, soft, hard


class DistillModule(L.LightningModule):
    """A causal student trained on token blocks against a frozen teacher (no teacher: the hard-label twin, plain
    next-token cross-entropy); validation scores held-out documents (`lib.scoring`)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None = None, temperature: float = 2.0,
                 alpha: float = 0.5, beta: float = 0.0, lmbda: float = 0.0, max_new_tokens: int = 16,
                 vocab: int | None = None, optimizer: dict | None = None, schedule: dict | None = None,
                 total_steps: int = 100, seed: int = 0, pad_id: int = 0, eos_id: int = 0, prefix: str = ""):
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.model = student
        self.frozen = [teacher]  # in a list: the teacher is not trained, checkpointed or wrapped by a strategy
        self.tokens_in_batch = 0
        self.batches = self.sampled = 0
        self.scores = scoring.Scores()

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.frozen[0]

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = batch.numel()
        p = self.hparams.prefix
        if self.teacher is None:
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log(f"{p}train/loss", loss, prog_bar=True)
            return loss
        sampled = self.hparams.lmbda > 0 and \
            random.Random(f"{self.hparams.seed}-{self.global_step}-{batch_idx}").random() <= self.hparams.lmbda
        ids, labels = self.sample(batch) if sampled else (batch, batch[:, 1:])
        vocab = self.hparams.vocab
        student = self.model(input_ids=ids).logits[:, :-1, :vocab]
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids).logits[:, :-1, :vocab]
        h = self.hparams
        loss, soft, hard = distillation_loss(student, teacher, labels, h.temperature, h.alpha, h.beta,
                                             hard_labels=not sampled)
        self.batches, self.sampled = self.batches + 1, self.sampled + int(sampled)
        self.log_dict({f"{p}train/loss": loss, f"{p}train/soft_loss": soft}, prog_bar=True)
        if not sampled:
            self.log(f"{p}train/hard_loss", hard)
        return loss

    @torch.no_grad()
    def sample(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels): each block's first tokens as the prompt, continued by the student's own samples
        (temperature 1); labels score only the sampled tokens up to and including the first EOS."""
        h = self.hparams
        cut = batch.shape[1] - h.max_new_tokens
        prompt = batch[:, :cut]
        with models.evaluating(self.model):
            ids = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=h.max_new_tokens,
                                      pad_token_id=h.pad_id, eos_token_id=h.eos_id)
        labels = ids[:, 1:].clone()
        labels[:, :cut - 1] = IGNORE
        new = ids[:, cut:] == h.eos_id
        labels[:, cut - 1:][(new.cumsum(1) - new.long()) > 0] = IGNORE  # after the first EOS
        return ids, labels

    def on_validation_epoch_start(self) -> None:
        self.scores = scoring.Scores()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.scores = self.scores + scoring.batch_scores(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        nll, count = sum_over_ranks(self, self.scores.nll, self.scores.count)
        self.scores = scoring.Scores(nll, int(count))
        p = self.hparams.prefix
        self.log_dict({f"{p}val/loss": self.scores.loss, f"{p}val/perplexity": self.scores.perplexity}, prog_bar=True)

    def configure_optimizers(self):
        return configure_optimizer(self.model.named_parameters(), self.hparams.optimizer or {},
                                   self.hparams.schedule or {}, self.hparams.total_steps)


# -- setup -----------------------------------------------------------------------------------------


def check_tokenizer(field: str, ref: str, theirs, ours, tokenize_step: str) -> None:
    """Refuse a model whose tokenizer maps ids to other tokens than the tokenize step's (before any training)."""
    mine, other = ours.get_vocab(), theirs.get_vocab()
    if mine == other:
        return
    differ = len(set(mine.items()) ^ set(other.items())) // 2 or abs(len(mine) - len(other))
    raise ValueError(f"{field} '{ref}': its tokenizer ({len(other)} tokens) is not the one of tokenize step "
                     f"'{tokenize_step}' ({len(mine)} tokens; about {differ} differ); teacher and student must "
                     f"share a tokenizer: give tokenizer: the tokenize step the {field} was trained on, or a {field} "
                     "trained on this one")


def load_models(spec: DistillSpec, ctx: StepContext, tokenizer):
    """(teacher, student, block length): both causal, on the tokenize step's tokenizer, checked before training."""
    teacher, teacher_tok = models.load_model(ctx.model_source(spec.teacher), "causal", dtype=torch.float32)
    check_tokenizer("teacher", spec.teacher, teacher_tok, tokenizer, spec.tokenizer)
    if isinstance(spec.student, str):
        student, student_tok = models.load_model(ctx.model_source(spec.student), "causal", dtype=torch.float32)
        student.train()  # from_pretrained leaves a model in eval mode
        check_tokenizer("student", spec.student, student_tok, tokenizer, spec.tokenizer)
        context = min(models.context_length(student), MAX_CONTEXT)
    else:
        student, context = models.build_model(spec.student, tokenizer, "causal"), spec.student.context
    for field, model in (("teacher", teacher), ("student", student)):
        width = model.get_output_embeddings().weight.shape[0]
        if width < len(tokenizer):  # a tokenizer with tokens added after the model was saved
            raise ValueError(f"{field} '{getattr(spec, field)}' predicts {width} tokens but tokenize step "
                             f"'{spec.tokenizer}' has {len(tokenizer)}; use a model built on that tokenizer")
    context = min(context, models.context_length(teacher))
    if spec.on_policy is not None and spec.on_policy.max_new_tokens >= context:
        raise ValueError(f"on_policy.max_new_tokens ({spec.on_policy.max_new_tokens}) must be below the block length "
                         f"({context}, the shorter of the models' contexts): the prompt is the rest of the block")
    return teacher, student, context


def fit_student(ctx: StepContext, loop, module: DistillModule, data: TokenDataModule, steps: int) -> L.Trainer:
    """Fit one student with the shared Trainer (checkpoints in `ctx.ckpt_dir`, resumed from there)."""
    trainer = make_trainer(ctx, loop, steps, params=count_parameters(module.model)[1])
    fit(trainer, module, datamodule=data, ctx=ctx)
    return trainer


def distil(ctx: StepContext, spec: DistillSpec, student, teacher, data: TokenDataModule, steps: int,
           common: dict) -> tuple[DistillModule, L.Trainer, dict[str, float]]:
    """Train the student against the teacher; (module, trainer, training metrics)."""
    policy = spec.on_policy
    module = DistillModule(student, teacher, spec.temperature, spec.alpha, policy.beta if policy else 0.0,
                           policy.lmbda if policy else 0.0, policy.max_new_tokens if policy else 16, **common)
    trainer = fit_student(dataclasses.replace(ctx, ckpt_dir=ctx.ckpt_dir / "distill"), spec.loop(), module, data,
                          steps)
    metrics = {k: last(trainer, k) for k in ("train/loss", "train/soft_loss", "train/hard_loss")}
    metrics.update({"train/steps": trainer.global_step, **trainer_perf(trainer)})
    if policy is not None:
        metrics["train/on_policy_fraction"] = module.sampled / module.batches if module.batches else float("nan")
    return module, trainer, metrics


def train_twin(ctx: StepContext, spec: DistillSpec, twin, data: TokenDataModule, done: int, common: dict) -> float:
    """Train the hard-label twin for the steps the distilled student took (early stopping included) on the same
    schedule and blocks, without a teacher; its last training loss."""
    module = DistillModule(twin, alpha=0.0, prefix="hard/", **common)
    loop = spec.loop().model_copy(update={"max_steps": max(done, 1), "max_tokens": None, "early_stopping": None})
    twin_ctx = dataclasses.replace(ctx, name=f"{ctx.name} (hard-label twin)", ckpt_dir=ctx.ckpt_dir / "hard")
    return last(fit_student(twin_ctx, loop, module, data, max(done, 1)), "hard/train/loss")


def last(trainer: L.Trainer, key: str) -> float:
    """The last logged value of `key` (NaN when this attempt logged none: a run resumed after its last step)."""
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else float("nan")


def trainer_perf(trainer: L.Trainer) -> dict[str, float]:
    """The distillation fit's training throughput (FLOP/s would leave out the teacher's forward passes)."""
    return {k: v for k, v in perf_metrics(trainer).items() if k == "perf/tokens_per_s"}


# -- report ----------------------------------------------------------------------------------------


def measure(name: str, model, tokenizer, windows, spec: DistillSpec, folder, device) -> dict:
    """One row of the report: held-out loss and perplexity, parameters, weights on disk, latency per token (every
    model measured on the same device)."""
    model.to(device)
    scores = scoring.score_windows(model, windows, spec.batch_size, pad_token(tokenizer))
    lat = spec.latency
    with models.evaluating(model):
        ms = serving.ms_per_token(model, tokenizer, lat.prompt, lat.new_tokens, lat.repeats)
    return {"model": name, "val/loss": scores.loss, "val/perplexity": scores.perplexity,
            "params": count_parameters(model)[1], "size_mb": serving.size_mb(folder), "ms_per_token": ms}


def format_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "model"]
    lines = [f"{'model':<10}" + "".join(f"{k:>16}" for k in keys)]
    lines += [f"{r['model']:<10}" + "".join(f"{r[k]:>16.5g}" for k in keys) for r in rows]
    return "\n".join(lines)


def compare(ctx: StepContext, spec: DistillSpec, tokenizer, windows, compared: list[tuple[str, object]], folder,
            device) -> list[dict]:
    """The report's rows, every model saved the same way (safetensors) for its size and measured on one device."""
    scratch = ctx.out_dir / ".scratch"
    rows = [measure(name, model, tokenizer, windows, spec, folder if name == "distilled" else
                    models.save_pretrained(model, tokenizer, scratch / name), device) for name, model in compared]
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def run(spec: DistillSpec, ctx: StepContext) -> StepOutput:
    """Load the teacher, build the student, distil it and train its hard-label twin, save, compare, log."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    upstream = ctx.step(spec.tokenizer)
    tokenizer = models.load_tokenizer(upstream.path("tokenizer"))
    teacher, student, context = load_models(spec, ctx, tokenizer)
    twin = copy.deepcopy(student) if spec.baseline else None  # the same initial weights
    data = TokenDataModule(str(upstream.path("tokens")), context=context, batch_size=spec.batch_size,
                           val_batches=spec.val_batches, seed=ctx.seed, tokenizer=tokenizer)
    windows = scoring.heldout_windows(upstream.path("tokens"), tokenizer, context, spec.val_batches * spec.batch_size)
    before = scoring.score_windows(student, windows, spec.batch_size, pad_token(tokenizer))
    per_step = spec.batch_size * spec.accumulate * world_size()
    steps = total_steps(spec.loop(), per_step * context)
    common = dict(optimizer=spec.optimizer.model_dump(), schedule=spec.schedule.model_dump(), total_steps=steps,
                  seed=ctx.seed, pad_id=pad_token(tokenizer), eos_id=tokenizer.eos_token_id, vocab=len(tokenizer))

    module, trainer, metrics = distil(ctx, spec, student, teacher, data, steps, common)
    done = int(metrics["train/steps"])
    if twin is not None:
        metrics["hard/train/loss"] = train_twin(ctx, spec, twin, data, done, common)
    folder = models.save_pretrained(module.model, tokenizer, ctx.out_dir / "model")
    compared = [("teacher", teacher), ("distilled", module.model)] + ([("hard", twin)] if twin is not None else [])
    rows = compare(ctx, spec, tokenizer, windows, compared, folder, trainer.strategy.root_device)
    metrics.update({"before/val/loss": before.loss, "before/val/perplexity": before.perplexity, **report_metrics(rows)})
    table = format_table(rows)
    (ctx.out_dir / "report.json").write_text(json.dumps(rows, indent=2))
    ctx.log_table(rows, "distill.json")
    print(f"{ctx.name}: after {done} steps\n{table}", flush=True)
    uri = ""
    if spec.log_model:
        from components.lib.mlflow_models import log_transformers_model

        uri = log_transformers_model(ctx, folder, task="text-generation")
    return StepOutput(outputs={"model": "model", "tokenizer": "model"}, metrics=metrics,
                      info={"context": context, "model_uri": uri, "table": table,
                            "effort": effort(examples=done * per_step, of="sequences")})  # each student's


def report_metrics(rows: list[dict]) -> dict[str, float]:
    """The report's rows as metrics: the distilled student's bare, `teacher/` and `hard/` prefixed, and ratios."""
    by = {r["model"]: r for r in rows}
    t, s = by["teacher"], by["distilled"]
    out = {"val/loss": s["val/loss"], "val/perplexity": s["val/perplexity"],
           "teacher/val/loss": t["val/loss"], "teacher/val/perplexity": t["val/perplexity"],
           "params/total": s["params"], "teacher/params/total": t["params"], "params/ratio": s["params"] / t["params"],
           "perf/size_mb": s["size_mb"], "teacher/perf/size_mb": t["size_mb"],
           "perf/size_ratio": s["size_mb"] / t["size_mb"], "perf/ms_per_token": s["ms_per_token"],
           "teacher/perf/ms_per_token": t["ms_per_token"], "perf/latency_ratio": s["ms_per_token"] / t["ms_per_token"]}
    if "hard" in by:
        out.update({"hard/val/loss": by["hard"]["val/loss"], "hard/val/perplexity": by["hard"]["val/perplexity"]})
    return out
