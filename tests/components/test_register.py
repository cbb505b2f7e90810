"""register: the gate's grammar and references, versions and aliases in a real MLflow registry, merged adapters."""

from __future__ import annotations

import os

import pytest

from components.lib.context import StepResult
from schemas.steps.register import RegisterSpec
from tests.conftest import REPO, check_contract, make_ctx

SPEC = """
name: gated
steps:
  tokenizer:
    kind: tokenize
    corpus: {builtin: pydoc}
  release:
    kind: register
    model: ./model
    name: gated-lm
    gate:
      - tokenizer.data/vocab_size > 10
      - {condition}
"""


def test_gate_syntax_error_names_the_condition_line(write_spec):
    import schemas

    with pytest.raises(schemas.SpecError) as err:
        schemas.load(write_spec(SPEC.replace("{condition}", "tokenizer.data/vocab_size => 3")))
    problem, = err.value.problems
    assert (problem.line, problem.path) == (13, "steps.release.gate[1]")
    assert "unknown comparison" in problem.message


def test_gate_steps_are_dependencies_with_did_you_mean(write_spec):
    import schemas
    from schemas import dependencies

    with pytest.raises(schemas.SpecError) as err:
        schemas.load(write_spec(SPEC.replace("{condition}", "tokeniser.val/perplexity < 40")))
    assert "no step named 'tokeniser' (did you mean 'tokenizer'?)" in str(err.value)
    assert ":13:" in str(err.value)
    loaded = schemas.load(write_spec(SPEC.replace("{condition}",
                                                  "tokenizer.val/tokens < tokenizer.train/tokens * 1.5")))
    assert dependencies(loaded.spec, "release") == ["tokenizer"]


def test_a_gate_on_a_metric_its_step_will_not_emit_is_a_spec_error(write_spec):
    import schemas

    with pytest.raises(schemas.SpecError) as err:
        schemas.load(write_spec(SPEC.replace("{condition}", "tokenizer.val/perplexity < 40")))
    [problem] = err.value.problems
    assert str(problem).endswith(":13:9: steps.release.gate[1]: step 'tokenizer' (tokenize) does not emit "
                                 "'val/perplexity' with its settings; it emits: data/vocab_size, train/documents, "
                                 "val/documents, train/tokens, val/tokens, data/chars_per_token, time/seconds")


@pytest.fixture
def store(tmp_path):
    """A sqlite MLflow store with a run for the step, as the engine would provide."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("gated", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment


def register(tmp_path, store, model, metrics, **fields):
    uri, client, experiment = store
    evaluation = StepResult("eval", "evaluate", "e" * 64, tmp_path, {}, metrics)
    spec = RegisterSpec(kind="register", model=str(model), name="tiny-lm", evidence=["eval"], **fields)
    ctx = make_ctx(tmp_path, name="release", kind="register", upstream={"eval": evaluation}, base_dir=REPO)
    ctx.tracking_uri, ctx.pipeline_name = uri, "gated"
    ctx.run_id = client.create_run(experiment, run_name="release").info.run_id
    from components import register as component

    out = component.run(spec, ctx)
    check_contract(spec, out)
    return out


def aliases(client):
    return {k: str(v) for k, v in client.get_registered_model("tiny-lm").aliases.items()}


def test_aliases_move_by_the_gate_and_the_version_loads(tmp_path, store, tiny_lm, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.lib.registry import download_registered

    uri, client, _ = store
    out = register(tmp_path, store, tiny_lm, {"val/perplexity": 30.0, "val/loss": 3.4},
                   gate=["eval.val/perplexity < 40"], beat_champion={"metric": "eval.val/perplexity", "mode": "min"})
    assert out.info["promoted"] and aliases(client) == {"candidate": "1", "champion": "1"}
    version = client.get_model_version("tiny-lm", "1")
    assert version.tags["metric.eval.val/perplexity"] == "30" and version.tags["metric.eval.val/loss"] == "3.4"
    assert version.tags["llmcycle.step"] == "release" and version.tags["llmcycle.fingerprint"] == "0" * 64
    assert version.tags["llmcycle.gate"] == "passed" and len(version.tags["llmcycle.git_commit"]) == 40
    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering leaves no process-wide MLflow state behind

    # Not better than the champion by 1.0: a new candidate, the champion stays, and the report says why.
    out = register(tmp_path, store, tiny_lm, {"val/perplexity": 29.5}, on_fail="continue",
                   gate=["eval.val/perplexity < 40"],
                   beat_champion={"metric": "eval.val/perplexity", "mode": "min", "by": 1.0})
    assert not out.info["promoted"] and out.metrics["gate/passed"] == 0.0
    assert aliases(client) == {"candidate": "2", "champion": "1"}
    printed = capsys.readouterr().out
    assert "[FAIL] beats champion on eval.val/perplexity" in printed and "improvement 0.5 < 1" in printed
    assert "'champion' not moved (stays on version 1)" in printed

    with pytest.raises(RuntimeError, match=r"\[FAIL\] eval.val/perplexity < 40: eval.val/perplexity = 55"):
        register(tmp_path, store, tiny_lm, {"val/perplexity": 55.0}, gate=["eval.val/perplexity < 40"])
    assert aliases(client) == {"candidate": "3", "champion": "1"}

    folder = download_registered("models:/tiny-lm@champion", tmp_path / "cache", uri)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    torch.testing.assert_close(got, want)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == AutoTokenizer.from_pretrained(tiny_lm).get_vocab()


def test_missing_metric_is_an_error_naming_what_the_step_reported(tmp_path, store, tiny_lm):
    with pytest.raises(ValueError, match=r"step 'eval' reported no metric 'val/ppl'; it reported: val/perplexity"):
        register(tmp_path, store, tiny_lm, {"val/perplexity": 30.0}, gate=["eval.val/ppl < 40"])


def test_a_lora_adapter_is_registered_merged(tmp_path, store, tiny_lm):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components.lib.registry import download_registered

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm), LoraConfig(r=4, lora_alpha=8))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change the outputs
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    register(tmp_path, store, tmp_path / "adapter", {"val/perplexity": 30.0})
    folder = download_registered("models:/tiny-lm@champion", tmp_path / "cache", store[0])
    assert not (folder / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3


def test_version_1_of_the_same_name_in_two_stores_downloads_as_two_models(tmp_path, tiny_lm):
    """The download cache is keyed by the version's origin, so another store's v1 is never served instead."""
    import shutil

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file, save_file

    from components.lib.registry import download_registered

    other = tmp_path / "other_model"
    shutil.copytree(tiny_lm, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 1.0 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    folders = []
    for name, model in (("a", tiny_lm), ("b", other)):
        root = tmp_path / name
        root.mkdir()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("gated", artifact_location=(root / "artifacts").as_uri())
        register(root, (uri, client, experiment), model, {"val/perplexity": 30.0},
                 gate=["eval.val/perplexity < 40"])
        folders.append(download_registered("models:/tiny-lm@champion", tmp_path / "cache", uri))
    assert folders[0] != folders[1]
    assert not load_file(folders[0] / "model.safetensors")["lm_head.weight"].equal(
        load_file(folders[1] / "model.safetensors")["lm_head.weight"])
