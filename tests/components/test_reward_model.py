"""The reward_model step: the Bradley-Terry loss checks (ALGORITHMS.md §2), pooling, data, and a real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from components.lib import preferences
from components.lib.rewards import load_reward_model, pooled_index, read_reward_stats, sequence_rewards
from components.reward_model import bradley_terry_loss, run
from schemas.steps.reward_model import RewardModelSpec
from tests.conftest import check_contract, finish, make_ctx


def test_loss_checks():
    r = torch.tensor([0.3, -1.2, 2.0])
    assert float(bradley_terry_loss(r, r.clone())) == pytest.approx(math.log(2), abs=1e-6)  # check 1
    r_c = torch.tensor([0.5, -0.2], requires_grad=True)
    r_r = torch.tensor([-0.1, 0.4])
    (bradley_terry_loss(r_c, r_r) * 2).backward()  # ×2 undoes the batch mean
    assert torch.allclose(r_c.grad, -torch.sigmoid(r_r - r_c.detach()))  # check 2
    zero = torch.zeros(3)
    assert float(bradley_terry_loss(zero, zero, margin=1.0)) == pytest.approx(1.3133, abs=1e-4)  # check 3
    x = torch.tensor([1.0, -2.0])
    assert float(bradley_terry_loss(x, -x, center_coef=0.01)) == pytest.approx(float(bradley_terry_loss(x, -x)))
    # a soft label of 0.5 is indifferent to the order; p = 1 is the hard loss
    half = torch.full((2,), 0.5)
    assert float(bradley_terry_loss(x, -x, half)) == pytest.approx(float(bradley_terry_loss(-x, x, half)))
    assert float(bradley_terry_loss(x, -x, torch.ones(2))) == pytest.approx(float(bradley_terry_loss(x, -x)))


def test_pooled_index_and_reward_same_under_left_and_right_padding(tiny_lm):
    model, tok = load_reward_model(str(tiny_lm))
    model.eval()
    ids = tok(["Copy: cat dog\nAnswer: cat dog", "Count: sun\nAnswer: 1"], add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    right = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    left = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask_r, mask_l = (right != tok.pad_token_id).long(), (left != tok.pad_token_id).long()
    idx_r, idx_l = pooled_index(mask_r), pooled_index(mask_l)
    assert right[0, idx_r[0]] == left[0, idx_l[0]] == ids[0][-1]  # check 5
    assert idx_r.tolist() == [len(x) - 1 for x in ids] and (idx_l == width - 1).all()
    with torch.no_grad():
        assert torch.allclose(sequence_rewards(model, right, mask_r), sequence_rewards(model, left, mask_l),
                              atol=1e-5)
        # the same number transformers' own pooling gives on right padding
        assert torch.allclose(sequence_rewards(model, right, mask_r), model(right, attention_mask=mask_r).logits[:, 0],
                              atol=1e-5)


def test_pad_equal_to_eos_gets_a_distinct_pad(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.pad_token = tok.eos_token
    folder = tmp_path / "lm"
    import shutil

    shutil.copytree(tiny_lm, folder)
    tok.save_pretrained(folder)
    model, tok2 = load_reward_model(str(folder))
    assert tok2.pad_token_id != tok2.eos_token_id and model.config.pad_token_id == tok2.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok2)  # a new pad token gets an embedding row


def test_builtin_pairs_have_ground_truth_and_disjoint_splits():
    train = preferences.builtin_pairs(0, "train", 20)
    held = preferences.builtin_pairs(0, "eval", 10)
    assert all(r["chosen"] != r["rejected"] for r in train + held)
    assert {r["task"] for r in train} == set(preferences.DEFAULT_TASKS) | {"wording"}
    triple = lambda rows: {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}  # noqa: E731
    assert not triple(held) & triple(train)
    from components.lib.evaluation import exact_match

    for r in train[:50]:
        if r["task"] != "wording":
            row = {"answer": r["chosen"].strip()}
            assert exact_match(r["chosen"], row["answer"]) and not exact_match(r["rejected"], row["answer"])


def test_chat_rows_and_bad_rows():
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    pair = preferences.normalize_pair({**row, "_where": "f.jsonl:1"})
    assert pair["chosen"].endswith("hello\n\n") and pair["rejected"].endswith("go away\n\n")
    with pytest.raises(ValueError, match=r"f.jsonl:3: preference rows need 'chosen' and 'rejected' \(missing rejected"):
        preferences.normalize_pair({"prompt": "p", "chosen": "c", "_where": "f.jsonl:3"})
    with pytest.raises(ValueError, match="f:1: 'score'.*got 1.5"):
        preferences.normalize_pair({"prompt": "p", "chosen": "c", "rejected": "r", "score": 1.5, "_where": "f:1"})


def test_run_builtin_learns_and_saves_a_loadable_folder(tiny_lm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    spec = RewardModelSpec(kind="reward_model", model=str(tiny_lm), data={"builtin": "preferences", "n_per_task": 16},
                           optimizer={"lr": 3e-3}, batch_size=16, max_steps=20, val_every=10, val_batches=2)
    ctx = make_ctx(tmp_path, name="rm", kind="reward_model")
    out = run(spec, ctx)
    m = out.metrics
    check_contract(spec, out)
    assert m["val/loss"] < math.log(2) and m["val/accuracy"] > m["before/val/accuracy"]
    folder = finish(ctx, out).path("reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.num_labels == 1
    assert read_reward_stats(folder)["reference_mean"] == pytest.approx(out.info["reference_mean"])


def test_run_lora_on_jsonl_files_with_soft_labels(tiny_lm, tmp_path):
    from peft import PeftModel  # noqa: F401  (the merged folder must not need peft)
    from transformers import AutoModelForSequenceClassification

    rows = [{"prompt": f"Review: the {n} was {a}.\nAnswer:", "chosen": f" {s}\n", "rejected": f" {o}\n",
             "score": 0.9}
            for n in ("soup", "movie", "hotel", "song") for a, s, o in (("great", "positive", "negative"),
                                                                       ("awful", "negative", "positive"))]
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = RewardModelSpec(kind="reward_model", model=str(tiny_lm), data={"files": ["prefs.jsonl"],
                           "eval_fraction": 0.25}, peft={"method": "lora", "r": 4}, max_steps=4, batch_size=4,
                           val_every=2, val_batches=1)
    ctx = make_ctx(tmp_path, name="rm", kind="reward_model")
    before = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1).state_dict()
    out = run(spec, ctx)
    after = AutoModelForSequenceClassification.from_pretrained(ctx.out_dir / "model").state_dict()
    changed = [k for k in before if "score" not in k and not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and not any("lora" in k for k in after)  # merged LoRA
    assert 0 <= out.metrics["val/accuracy"] <= 1


def test_schema_errors():
    with pytest.raises(ValueError, match="exactly one of files, builtin, step"):
        RewardModelSpec(kind="reward_model", model="sft", data={})
    with pytest.raises(ValueError, match="reward models support full, lora or bitfit"):
        RewardModelSpec(kind="reward_model", model="sft", data={"builtin": "preferences"},
                        peft={"method": "prompt_tuning"})
