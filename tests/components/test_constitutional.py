"""`constitutional`: transcript shapes, label math, splits, and the step end to end on a tiny model."""

import collections
import json
import math
import random
from pathlib import Path

import pytest
import torch

from components import constitutional as cai
from components.constitutional import rl, transcripts as T
from components.lib import judging
from components.lib import assets
from schemas.constitution import load_constitution
from schemas.steps.constitutional import ConstitutionalSpec, FeedbackSpec
from tests.conftest import check_contract, finish, make_ctx


def test_principles_are_drawn_uniformly():
    principles = load_constitution(assets.path("constitution.yaml")).principles
    counts = collections.Counter(p.name for p in T.draw_principles(random.Random(0), principles, 16000))
    expected = 16000 / len(principles)
    chi2 = sum((counts[p.name] - expected) ** 2 / expected for p in principles)
    assert set(counts) == {p.name for p in principles}
    assert chi2 < 24.3  # 99.9th percentile of chi-square with 7 degrees of freedom


def test_sft_targets_hold_no_critique_and_halves_are_disjoint():
    c = load_constitution(assets.path("constitution.yaml"))
    rows = []
    for i in range(10):
        p = c.principles[i % len(c.principles)]
        rounds = [{"round": 1, "principle": p.name, "critic_prompt": p.critique, "critic_response": f"bad {i}",
                   "revision_prompt": p.revision, "revision_response": f"better {i}"}]
        rows.append(T.published_row(f"prompt {i}", f"reply {i}", rounds))
    sft, prefs = T.split_halves(rows, 0.5, seed=3)
    assert len(sft) == 5 and {r["prompt"] for r in sft}.isdisjoint(r["prompt"] for r in prefs)
    for row in sft:
        target = T.sft_row(row, T.human_turn(row["prompt"]))
        text = target["completion"] + json.dumps(target["messages"])
        assert target["completion"] == " " + row["revision_response"]
        assert "Critique" not in text and row["critic_response"] not in text and row["critic_prompt"] not in text
    pair = T.revision_pair(prefs[0])
    assert pair["chosen"][-1]["content"].startswith("better") and pair["rejected"][-1]["content"].startswith("reply")
    assert set(rows[0]) >= {"init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
                            "revision_response", "prompt"}


def test_soft_labels_sum_to_one():
    la, lb = torch.randn(100), torch.randn(100)
    pa, pb = judging.soft_label(la, lb), judging.soft_label(lb, la)
    assert torch.allclose(pa + pb, torch.ones(100))
    assert torch.allclose(pa, torch.sigmoid(la - lb))


class KeywordJudge(torch.nn.Module):
    """A position-free judge: the logit of each option counts 'please' in that option's reply."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok, self.w = tokenizer, torch.nn.Parameter(torch.zeros(1))
        self.a, self.b = judging.option_ids(tokenizer, ("A", "B"))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for i, row in enumerate(input_ids):
            text = self.tok.decode(row[attention_mask[i].bool()][:-1])  # drop the option being scored
            a, b = text.split("(A)")[1].split("(B)")
            logits[i, -2, self.a], logits[i, -2, self.b] = a.count("please"), b.split("Answer:")[0].count("please")
        return type("Out", (), {"logits": logits})()


def test_swapping_a_and_b_flips_the_label_for_a_position_free_judge(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    judge = KeywordJudge(tok)
    fb = FeedbackSpec(options=("A", "B"))
    text = lambda a, b: rl.comparison_text(fb.template, "Which reply is polite?", "Shut the door", a, b)  # noqa
    good, bad = "please please shut it", "shut it please"
    pa, pa_swapped = judging.judge(judge, tok, [text(good, bad), text(bad, good)], fb.options)
    assert pa == pytest.approx(1 / (1 + math.exp(-1))) and pa_swapped == pytest.approx(1 - pa)
    principles = load_constitution(assets.path("constitution.yaml")).principles[:1]
    items = [{"prompt": "x", "first": good, "second": bad, "reference": True} for _ in range(40)]
    rows = rl.label_pairs(judge, tok, items, principles, fb, seed=0)
    assert {r["first_shown_as"] for r in rows} == {"A", "B"}  # the order is randomised ...
    assert all(r["chosen"] == good and r["score"] == pytest.approx(pa) for r in rows)  # ... and cannot matter
    stats = rl.label_stats(rows)
    assert stats["labels/agreement"] == 1.0 and abs(stats["labels/position_bias"]) < 0.2


def test_bad_inputs_are_named(tiny_lm, tmp_path):
    ctx = make_ctx(tmp_path)
    with pytest.raises(ValueError, match="'politee' is not in the constitution \\(did you mean 'polite'\\?\\)"):
        cai.load_principles(ConstitutionalSpec(kind="constitutional", model="m", principles=["politee"]), ctx)
    (tmp_path / "bad.yaml").write_text("principles:\n  - name: x\n    critque: y\n")
    from schemas.errors import SpecError
    with pytest.raises(SpecError, match="bad.yaml:3:5"):
        cai.load_principles(ConstitutionalSpec(kind="constitutional", model="m", constitution="bad.yaml"), ctx)
    from transformers import AutoTokenizer
    a, b = judging.option_ids(AutoTokenizer.from_pretrained(tiny_lm), (" Answer A", " B"))
    assert len(a) > 1 and len(b) >= 1  # multi-token options are scored by their summed log-prob


def test_step_runs_end_to_end_and_its_data_feeds_dpo(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from components import dpo
    from schemas.steps.dpo import DpoSpec

    spec = ConstitutionalSpec(kind="constitutional", model=str(tiny_lm), prompts={"builtin": "red_team", "limit": 8},
                              rounds=2, few_shot=1, sampling={"max_new_tokens": 6}, max_length=96,
                              peft={"method": "lora", "r": 4}, batch_size=4, max_steps=3, val_every=3, val_batches=1)
    ctx = make_ctx(tmp_path, name="cai", kind="constitutional")
    out = cai.run(spec, ctx)
    check_contract(spec, out)
    result = finish(ctx, out)
    data = result.path("data")
    rows = [json.loads(line) for line in (data / "cai.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["rounds"]) == 2 for r in rows)
    sft = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    prefs = [json.loads(line) for line in (data / "preferences.jsonl").read_text().splitlines()]
    assert len(sft) == 4 and len(prefs) == 4
    assert all(0.5 <= p["score"] <= 1 for p in prefs)
    assert out.metrics["labels/reference_pairs"] == 4 and 0 <= out.metrics["labels/agreement"] <= 1
    assert "train/loss" in out.metrics
    AutoModelForCausalLM.from_pretrained(result.path("model"))
    dspec = DpoSpec(kind="dpo", model="cai", data={"step": "cai", "eval_fraction": 0.25, "max_length": 64},
                    batch_size=2, max_steps=2, val_every=2, val_batches=1)
    dctx = make_ctx(tmp_path, name="dpo", kind="dpo", upstream={"cai": result})
    assert dpo.run(dspec, dctx).metrics["data/train_pairs"] == 3


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_hub_spec_runs_on_a_tiny_local_qwen2_with_a_chat_template(tiny_lm, tmp_path):
    """No machine here can download the 0.5B model: the same spec runs on a tiny Qwen2 saved the same way."""
    import schemas
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "tiny-qwen")
    tok.save_pretrained(tmp_path / "tiny-qwen")
    spec_path = tmp_path / "constitutional-hub.yaml"
    spec_path.write_text((Path(__file__).resolve().parents[2] / "specs" / "constitutional-hub.yaml").read_text())
    loaded = schemas.load(spec_path, [
        "steps.cai.model=./tiny-qwen", "steps.cai.prompts.limit=4", "steps.cai.rounds=1",
        "steps.cai.sampling.max_new_tokens=4", "steps.cai.max_length=128", "steps.cai.batch_size=2",
        "steps.cai.max_steps=2", "steps.cai.val_every=2", "steps.cai.val_batches=1"])
    spec = loaded.spec.steps["cai"]
    ctx = make_ctx(tmp_path, name="cai", kind="constitutional", base_dir=tmp_path)
    out = cai.run(spec, ctx)
    sft = [json.loads(line) for line in (ctx.out_dir / "data" / "sft.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<|im_start|>user\n") for r in sft)  # the policy is asked in its chat format
    assert out.metrics["labels/pairs"] == 2 and "model" in out.outputs
