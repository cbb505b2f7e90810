"""Our reward-model loss and accuracy against TRL's RewardTrainer on the same tokens and initial weights."""

from __future__ import annotations

import pytest
import torch

from components.lib.preferences import builtin_pairs, collate_pairs, encode_pairs, normalize_pair
from components.lib.rewards import load_reward_model, sequence_rewards
from components.reward_model import bradley_terry_loss, evaluate_pairs, run
from schemas.steps.reward_model import RewardModelSpec
from tests.conftest import make_ctx

STEPS, BATCH, LR = 15, 16, 3e-3


@pytest.fixture
def start(tiny_lm, tmp_path):
    """The initial reward model (seeded head) saved once, so both trainers start from the same weights."""
    model, tok = load_reward_model(str(tiny_lm), seed=0)
    model.save_pretrained(tmp_path / "rm0")
    tok.save_pretrained(tmp_path / "rm0")
    return tmp_path / "rm0"


def _encoded(tok, split: str, n: int) -> list[dict]:
    return encode_pairs([normalize_pair(r) for r in builtin_pairs(0, split, n)], tok, 256)


def test_reward_loss_and_accuracy_match_trl(start, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tok = load_reward_model(str(start), seed=0)
    train = _encoded(tok, "train", 16)
    held = _encoded(tok, "eval", 8)  # what run() holds out for n_per_task 16
    args = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                        report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=STEPS,
                        disable_dropout=True)
    data = Dataset.from_list([{"chosen_ids": r["chosen"][0], "rejected_ids": r["rejected"][0]} for r in train])
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)

    # step 0: TRL's loss on TRL's collated batch equals ours on our batch of the same pairs
    rows = [{"chosen_ids": r["chosen"][0], "rejected_ids": r["rejected"][0]} for r in train[:BATCH]]
    trl_batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(trl_batch))
        ours = collate_pairs(train[:BATCH], tok.pad_token_id)
        r_c, r_r = sequence_rewards(model, ours["input_ids"], ours["attention_mask"]).chunk(2)
    assert float(bradley_terry_loss(r_c, r_r)) == pytest.approx(float(trl_loss), abs=1e-5)

    loader = torch.utils.data.DataLoader(held, batch_size=BATCH, collate_fn=lambda b: collate_pairs(b, tok.pad_token_id))
    initial = evaluate_pairs(model, loader)
    model.train()
    trainer.train()
    trl_metrics = evaluate_pairs(model, loader)

    spec = RewardModelSpec(kind="reward_model", model=str(start), data={"builtin": "preferences", "n_per_task": 16},
                           optimizer={"lr": LR, "betas": (0.9, 0.999), "weight_decay": 0.0},
                           schedule={"decay": "constant"}, batch_size=BATCH, max_steps=STEPS, val_every=STEPS,
                           val_batches=1)
    ctx = make_ctx(tmp_path, name="rm", kind="reward_model")
    ours_metrics = run(spec, ctx).metrics
    assert ours_metrics["before/val/accuracy"] == pytest.approx(initial["val/accuracy"], abs=1e-6)
    # different shuffles, same recipe: comparable accuracy and loss after the same number of steps
    assert abs(ours_metrics["val/accuracy"] - trl_metrics["val/accuracy"]) <= 0.15
    assert ours_metrics["val/loss"] < initial["val/loss"] and trl_metrics["val/loss"] < initial["val/loss"]
