"""What can be known before anything trains is a spec error with its line (schemas/contracts.py)."""

from __future__ import annotations

import pytest

import schemas

HEAD = """\
name: c
steps:
  tok: {kind: tokenize, corpus: {builtin: pydoc}}
  base: {kind: pretrain, tokenizer: tok, model: {family: llama}}
"""


def problems(write_spec, body: str) -> list[str]:
    path = write_spec(HEAD + body)
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(path)
    return [str(p).removeprefix(f"{path}:") for p in err.value.problems]


def test_a_reference_to_an_output_the_settings_rule_out(write_spec):
    found = problems(write_spec, "  sft: {kind: finetune, model: base, data: {builtin: tasks}, "
                                 "peft: {method: prompt_tuning}}\n  ev: {kind: evaluate, model: sft}\n")
    assert found == ["6:31: steps.ev.model: step 'sft' (finetune) writes no model: peft method prompt_tuning writes an "
                     "adapter only (prompt tuning has no merged form); it writes adapter, metrics, tokenizer; steps "
                     "that write one: base"]
    found = problems(write_spec, "  d: {kind: dpo, model: base, data: {builtin: preferences}, peft: {method: full}}\n"
                                 "  opt: {kind: optimize, model: base, adapter: d}\n")
    assert found == ["6:47: steps.opt.adapter: step 'd' (dpo) writes no adapter: peft method full trains the weights "
                     "themselves, so there is no adapter; it writes model, tokenizer"]


def test_a_masked_model_where_a_causal_one_is_needed(write_spec):
    found = problems(write_spec, "  mlm: {kind: pretrain, tokenizer: tok, model: {family: bert}, objective: masked}\n"
                                 "  sft: {kind: finetune, model: mlm, data: {builtin: tasks}}\n")
    assert found == ["6:32: steps.sft.model: step 'mlm' (pretrain) makes a masked LM; this field needs a causal LM"]


def test_evaluate_with_nothing_to_measure_scores_its_chain_or_is_an_error(write_spec):
    loaded = schemas.load(write_spec(HEAD + "  sft: {kind: finetune, model: base, data: {builtin: tasks}}\n"
                                            "  ev: {kind: evaluate, model: sft}\n"))
    assert loaded.spec.steps["ev"].tokens == "tok"  # the held-out tokens base (sft's start) was trained on
    assert schemas.dependencies(loaded.spec, "ev") == ["sft", "tok"]
    found = problems(write_spec, "  ev: {kind: evaluate, model: 'hf:gpt2'}\n")
    assert found == ["5:7: steps.ev: evaluate has nothing to measure: give tokens, texts, tasks, generation or "
                     "embeddings (its model 'hf:gpt2' was not trained on a tokenize step of this pipeline, so there "
                     "are no held-out tokens to default to)"]


def test_a_gate_on_a_metric_the_step_will_not_emit(write_spec):
    found = problems(write_spec, "  ev: {kind: evaluate, model: base, texts: [hello]}\n"
                                 "  r:\n    kind: register\n    model: base\n    name: m\n"
                                 "    gate: [ev.val/perplexity < 9, base.val/perplexity_initial > 1]\n"
                                 "    beat_champion: {metric: ev.texts/perplexity, mode: min}\n")
    assert found == [
        "10:12: steps.r.gate[0]: step 'ev' (evaluate) does not emit 'val/perplexity' with its settings (did you mean "
        "'texts/perplexity'?); it emits: texts/loss, texts/perplexity, texts/tokens, texts/next_token_top1, "
        "texts/next_token_top5, time/seconds",
        "10:35: steps.r.gate[1]: step 'base' (pretrain) does not emit 'val/perplexity_initial' with its settings (did "
        "you mean 'val/perplexity'?); it emits: val/loss, val/perplexity, before/val/loss, before/val/perplexity, "
        "train/loss, train/steps, train/tokens, train/flops, params/total, params/non_embedding, perf/tokens_per_s, "
        "perf/flops_per_s, perf/compile_speedup, time/seconds"]


def test_task_names_are_checked_everywhere(write_spec):
    found = problems(write_spec, "  p: {kind: ppo, policy: base, reward: {function: exact_match}, "
                                 "prompts: {builtin: tasks, tasks: [sentimnet]}}\n")
    assert len(found) == 1 and found[0].startswith("5:99: steps.p.prompts.tasks[0]: Input should be 'copy'")


def test_input_files_come_from_the_field_types(write_spec, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    loaded = schemas.load(write_spec(HEAD + "  sft: {kind: finetune, model: base, data: {files: [d.jsonl], "
                                            "eval_files: [e*.jsonl]}}\n"
                                            "  ev: {kind: evaluate, model: base, tasks: {items: [{name: t, "
                                            "file: t.jsonl}]}}\n"))
    assert loaded.spec.steps["sft"].input_globs() == ["d.jsonl", "e*.jsonl"]
    assert loaded.spec.steps["ev"].input_globs() == ["t.jsonl"]
    assert loaded.spec.steps["base"].input_globs() == []


def test_reading_a_held_out_split_that_is_not_written(write_spec):
    head = "name: c\nsteps:\n  tok: {kind: tokenize, corpus: {builtin: pydoc}, val_fraction: 0}\n"
    path = write_spec(head + "  base: {kind: pretrain, tokenizer: tok, model: {family: llama}}\n"
                             "  ev: {kind: evaluate, model: base}\n"
                             "  ev2: {kind: evaluate, model: base, tokens: tok, split: train}\n")
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(path)
    assert [str(p).removeprefix(f"{path}:") for p in err.value.problems] == [
        "4:37: steps.base.tokenizer: this reads the held-out split of step 'tok', which holds no documents out "
        "(val_fraction: 0); give it a val_fraction above 0",
        "5:7: steps.ev: evaluate has nothing to measure: give tokens, texts, tasks, generation or embeddings (the "
        "tokenize step 'tok' its model was trained on holds no documents out (val_fraction: 0))"]  # ev2 reads train
