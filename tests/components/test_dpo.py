"""`dpo`: the loss (ln 2 at the reference, soft labels, equal to TRL's), and a tiny end-to-end run."""

import json
import math

import pytest
import torch

from components import dpo
from schemas.steps.dpo import DpoSpec
from tests.conftest import check_contract, finish, make_ctx


def test_loss_is_ln2_when_policy_equals_reference_and_soft_labels_flip():
    logps = torch.tensor([-3.0, -7.5, -1.2])
    loss, cr, rj = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    assert torch.all(cr == 0) and torch.all(rj == 0)
    pc, pr, rc, rr = torch.randn(4, 5)
    s = torch.rand(5)
    forward, _, _ = dpo.dpo_loss(pc, pr, rc, rr, 0.5, s)
    swapped, _, _ = dpo.dpo_loss(pr, pc, rr, rc, 0.5, 1 - s)
    assert torch.allclose(forward, swapped)
    half, _, _ = dpo.dpo_loss(pc, pr, rc, rr, 0.5, torch.full((5,), 0.5))
    assert half.min() >= math.log(2) - 1e-6  # a coin-flip label is best served by no preference


def test_loss_matches_trl_dpo_trainer(tiny_lm, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    torch.manual_seed(1)
    policy, reference = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():  # make policy and reference differ so the loss is not ln 2
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [{"prompt": "Ask for the door.", "chosen": " Please close the door.", "rejected": " Shut the door."},
            {"prompt": "Greet me.", "chosen": " Hello, nice to see you.", "rejected": " Go away."}]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, beta=0.3, report_to=[], use_cpu=True,
                     max_length=64)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(policy, batch))
        ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        pc, pr = dpo.completion_logps(policy, ids, attn, comp).chunk(2)
        rc, rr = dpo.completion_logps(reference, ids, attn, comp).chunk(2)
        ours = float(dpo.dpo_loss(pc, pr, rc, rr, 0.3)[0].mean())
    assert abs(theirs - math.log(2)) > 1e-3
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_dpo_step_learns_preferences_and_saves_loadable_models(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = DpoSpec(kind="dpo", model=str(tiny_lm), data={"builtin": "preferences", "tasks": ["polite"],
                                                         "n_per_task": 32, "max_length": 64},
                   beta=0.5, peft={"method": "lora", "r": 8}, optimizer={"lr": 1e-2}, batch_size=8, max_steps=20,
                   val_every=10, val_batches=2)
    ctx = make_ctx(tmp_path, name="dpo", kind="dpo")
    out = dpo.run(spec, ctx)
    m = out.metrics
    check_contract(spec, out)
    assert m["before/val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["val/loss"] < math.log(2) - 0.05  # started at ln 2 (LoRA starts as the reference)
    assert m["val/rewards/accuracy"] > 0.6 and m["val/rewards/margin"] > 0
    result = finish(ctx, out)
    merged = AutoModelForCausalLM.from_pretrained(result.path("model"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), result.path("adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_full_weights_use_a_frozen_copy_and_step_data_with_soft_labels(tiny_lm, tmp_path):
    data = tmp_path / "prefs" / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": f"Ask {i}.", "chosen": " Please do it, thank you.", "rejected": " Do it now.",
             "score": 0.9} for i in range(24)]
    (data / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from components.lib.context import StepResult

    upstream = {"cai": StepResult(name="cai", kind="constitutional", fingerprint="f", dir=tmp_path / "prefs",
                                  outputs={"data": "data"}, metrics={})}
    spec = DpoSpec(kind="dpo", model=str(tiny_lm), data={"step": "cai", "max_length": 32}, peft={"method": "full"},
                   optimizer={"lr": 1e-3}, batch_size=8, max_steps=6, val_every=6, val_batches=1)
    policy, reference, _ = dpo.load_policy_and_reference(spec, make_ctx(tmp_path, upstream=upstream))
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    out = dpo.run(spec, make_ctx(tmp_path, name="dpo_full", kind="dpo", upstream=upstream))
    assert out.metrics["val/rewards/margin"] > 0
    assert set(out.outputs) == {"model", "tokenizer"}
