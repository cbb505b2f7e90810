"""mlp, rnn, lstm (components/lib/sequence_models.py): pretrained by the pretrain step, loaded by plain transformers
in a fresh process, transformers' loss, padding and cache in generation, scoring, evaluate, finetune, register."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, check_contract, finish, make_ctx

FAMILIES = ("mlp", "rnn", "lstm")
PROMPTS = ["The for statement", "A class definition is a", "x"]


def model_spec(family: str) -> dict:
    return {"family": family, "layers": 2, "hidden": 32, "context": 64, **({"window": 4} if family == "mlp" else {})}


@pytest.fixture(scope="module")
def pretrained(tokenized, tmp_path_factory) -> dict:
    """Each family pretrained for 20 steps by the pretrain component: {family: (spec, output, model folder)}."""
    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec

    done = {}
    for family in FAMILIES:
        spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", model=model_spec(family), max_steps=20,
                            val_every=10, batch_size=8, val_batches=2, optimizer={"lr": 1e-2}, log_model=False)
        ctx = make_ctx(tmp_path_factory.mktemp(family), name=family, kind="pretrain", upstream={"tokenizer": tokenized})
        out = pretrain.run(spec, ctx)
        done[family] = (spec, out, ctx.out_dir / out.outputs["model"])
    return done


def tiny(family: str, **kw):
    from transformers import AutoModelForCausalLM

    from components.lib import sequence_models

    torch.manual_seed(0)
    config = sequence_models.build_config(family, vocab_size=40, hidden_size=16, num_hidden_layers=2, pad_token_id=0,
                                          eos_token_id=2, **kw)
    return AutoModelForCausalLM.from_config(config).eval()


def test_each_family_pretrains_and_saves_a_folder_without_code(pretrained):
    for family, (spec, out, folder) in pretrained.items():
        m = out.metrics
        check_contract(spec, out)
        assert m["val/loss"] < m["before/val/loss"] - 0.3, (family, m)
        assert m["perf/tokens_per_s"] > 0 and m["params/total"] > m["params/non_embedding"] > 0
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == f"llmcycle_{family}_lm" and "auto_map" not in config
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))


def test_a_fresh_process_loads_them_with_plain_transformers(pretrained, tmp_path):
    from components.lib import models

    ids = [[1, 5, 9, 14, 3, 7], [1, 22, 8, 8, 40, 2]]
    folders, want = [], []
    for family, (_, _, folder) in pretrained.items():
        model, _ = models.load_model(folder)  # llmcycle's loader: safetensors only, no code to trust
        assert model.config.model_type == f"llmcycle_{family}_lm"
        with torch.no_grad():
            want.append(model.eval()(torch.tensor(ids)).logits)
        folders.append(str(folder))
    script = ("import json, sys, torch\nimport components.lib.models\n"
              "from transformers import AutoModelForCausalLM\n"
              "ids = torch.tensor(json.loads(sys.argv[1]))\n"
              "for i, folder in enumerate(sys.argv[3:]):\n"
              "    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()\n"
              "    with torch.no_grad():\n"
              "        torch.save(model(ids).logits, f'{sys.argv[2]}/{i}.pt')\n")
    subprocess.run([sys.executable, "-c", script, json.dumps(ids), str(tmp_path), *folders], cwd=REPO, check=True,
                   timeout=300, capture_output=True)
    for i, logits in enumerate(want):
        assert torch.equal(torch.load(tmp_path / f"{i}.pt"), logits), FAMILIES[i]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_is_transformers_shifted_cross_entropy(family):
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = tiny(family, **({"direct_connections": True} if family == "mlp" else {}))
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt not trained on
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (3, 9, 40)
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, shifted)
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, vocab_size=40))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prediction_reads_the_past_only_and_the_mlp_its_window_only(family):
    model = tiny(family, **({"window": 3} if family == "mlp" else {}))
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    future, first = ids.clone(), ids.clone()
    future[:, 6:] = (future[:, 6:] + 1) % 37 + 3
    first[:, 0] = (first[:, 0] + 1) % 37 + 3
    with torch.no_grad():
        logits, changed_future, changed_first = (model(input_ids=x).logits for x in (ids, future, first))
    assert torch.equal(changed_future[:, :6], logits[:, :6]) and not torch.equal(changed_future[:, 6], logits[:, 6])
    assert not torch.equal(changed_first[:, 2], logits[:, 2])
    assert torch.equal(changed_first[:, 3:], logits[:, 3:]) == (family == "mlp")  # a state carries token 0 on


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_leaves_the_real_positions_as_they_were(family):
    model = tiny(family)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        pad = torch.zeros((2, 3), dtype=torch.long)
        left = model(input_ids=torch.cat([pad, ids], 1), attention_mask=torch.cat([pad, torch.ones_like(ids)], 1))
        right = model(input_ids=torch.cat([ids, pad], 1), attention_mask=torch.cat([torch.ones_like(ids), pad], 1))
    torch.testing.assert_close(left.logits[:, 3:], alone)
    torch.testing.assert_close(right.logits[:, :6], alone)


def test_left_padded_generation_continues_as_unpadded_with_and_without_the_cache(pretrained):
    from components.lib import generation, models

    for family, (_, _, folder) in pretrained.items():
        model, tok = models.load_model(folder)
        for strategy in ("greedy", "beam"):
            batched = generation.generate_texts(model, tok, PROMPTS, strategy, max_new_tokens=8, num_beams=3)
            alone = [generation.generate_texts(model, tok, [p], strategy, max_new_tokens=8, num_beams=3)[0]
                     for p in PROMPTS]
            assert batched == alone, (family, strategy)
        batch = generation.encode_prompts(tok, PROMPTS)
        assert (batch["attention_mask"] == 0).any()  # the batch is left-padded
        widths = []
        hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
        with torch.no_grad():
            cached = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            hook.remove()
            uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                      use_cache=False)
        assert torch.equal(cached, uncached), family
        # Each step reads the window (mlp), or one new token on top of the recurrent state (rnn, lstm).
        width = batch["input_ids"].shape[1]
        first, step = (min(width, 4), 4) if family == "mlp" else (width, 1)
        assert widths == [first] + [step] * (len(widths) - 1), (family, widths)


def test_llmcycle_generate_continues_a_prompt(pretrained, capsys):
    from flows.cli import main

    for family, (_, _, folder) in pretrained.items():
        assert main(["generate", str(folder), "--prompt", "The for statement", "--max-new-tokens", "5",
                     "--strategy", "beam", "--json"]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["prompt"] == "The for statement" and row["completion"], family


def test_scoring_gives_the_same_perplexity_batched_and_one_by_one(pretrained, tokenized):
    from components.lib import models, scoring
    from components.lib.text import pad_token

    for family, (_, out, folder) in pretrained.items():
        model, tok = models.load_model(folder)
        windows = scoring.heldout_windows(tokenized.path("tokens"), tok, 64, limit=12)
        batched = scoring.score_windows(model, windows, 4, pad_token(tok))
        single = scoring.score_windows(model, windows, 1, pad_token(tok))
        assert batched.count == single.count > 0
        assert batched.nll == pytest.approx(single.nll, rel=1e-5), family
        assert 1 < batched.perplexity < out.metrics["before/val/perplexity"], family


def test_evaluate_measures_and_decodes_them(pretrained, tokenized, tmp_path):
    from components import evaluate
    from schemas.steps.evaluate import EvaluateSpec

    for family, (_, _, folder) in pretrained.items():
        spec = EvaluateSpec(kind="evaluate", model=str(folder), tokens="tokenizer", max_batches=2,
                            generation={"prompts": PROMPTS[:2], "max_new_tokens": 6, "num_beams": 2},
                            tasks={"builtin": "tasks", "n_per_task": 1, "tasks": ["copy"]})
        ctx = make_ctx(tmp_path, name=f"{family}_eval", kind="evaluate", upstream={"tokenizer": tokenized})
        out = evaluate.run(spec, ctx)
        check_contract(spec, out)
        assert 1 < out.metrics["val/perplexity"] < 2000 and 0 <= out.metrics["tasks/0shot/accuracy"] <= 1
        rows = [json.loads(line) for line in (ctx.out_dir / "generations.jsonl").read_text().splitlines()]
        assert {r["strategy"] for r in rows} == {"greedy", "sample", "top_k", "top_p", "beam"}


def test_finetune_trains_them_fully_and_lora_where_peft_can(pretrained, tmp_path):
    from components import finetune
    from schemas.steps.finetune import FinetuneSpec

    def tune(family, peft):
        spec = FinetuneSpec.model_validate({
            "kind": "finetune", "model": str(pretrained[family][2]), "peft": peft, "max_steps": 6, "batch_size": 8,
            "val_every": 6, "val_batches": 1, "optimizer": {"lr": 1e-2},
            "data": {"builtin": "tasks", "tasks": ["copy"], "n_per_task": 16, "eval_per_task": 2}})
        ctx = make_ctx(tmp_path, name=f"{family}_{peft['method']}", kind="finetune")
        out = finetune.run(spec, ctx)
        check_contract(spec, out)
        return finish(ctx, out)

    from safetensors.torch import load_file

    full = tune("lstm", {"method": "full"})
    start = load_file(pretrained["lstm"][2] / "model.safetensors")
    end = load_file(full.path("model") / "model.safetensors")
    assert start.keys() == end.keys() and all(not torch.equal(start[k], end[k]) for k in start)
    lora = tune("mlp", {"method": "lora", "r": 4, "target_modules": ["all-linear"]})
    assert 0 < lora.metrics["params/trainable"] < lora.metrics["params/total"]
    assert (lora.path("adapter") / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match=r"peft.method 'lora' cannot train family lstm: .*torch.nn.LSTM"):
        tune("lstm", {"method": "lora"})
    with pytest.raises(ValueError, match=r"peft.method 'lora' on family mlp needs peft.target_modules"):
        tune("mlp", {"method": "lora"})


@pytest.mark.parametrize("family", FAMILIES)
def test_each_peft_method_trains_what_it_says_or_names_itself_in_the_error(family):
    from components.lib.peft import apply_peft
    from schemas.peft import PeftSpec

    works = {"full", "bitfit"} | ({"prune", "lora", "ia3"} if family == "mlp" else set())
    targets = {"lora": ["all-linear"], "ia3": ["layers.0", "layers.1"]}
    for method in ("full", "bitfit", "prune", "lora", "ia3", "prompt_tuning"):
        spec = PeftSpec(method=method, **({"target_modules": targets[method]} if method in targets else {}))
        if method not in works:
            with pytest.raises(ValueError, match=rf"^peft.method '{method}' cannot train family {family}: "):
                apply_peft(tiny(family), spec)
            continue
        model = apply_peft(tiny(family), spec)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained, (family, method)
        if method == "bitfit":  # the recurrent layers' bias_ih_l0 / bias_hh_l0 count as biases
            assert all(n.rsplit(".", 1)[-1].startswith("bias") for n in trained), trained


def test_register_logs_them_with_mlflow_transformers_flavor(pretrained, tmp_path):
    from mlflow.tracking import MlflowClient

    from components import register
    from components.lib.context import StepResult
    from components.lib.registry import download_registered
    from schemas.steps.register import RegisterSpec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("seq", artifact_location=(tmp_path / "artifacts").as_uri())
    folder = pretrained["lstm"][2]
    evaluation = StepResult("eval", "evaluate", "e" * 64, tmp_path, {}, {"val/perplexity": 30.0})
    spec = RegisterSpec(kind="register", model=str(folder), name="lstm-lm", evidence=["eval"],
                        gate=["eval.val/perplexity < 40"])
    ctx = make_ctx(tmp_path, name="release", kind="register", upstream={"eval": evaluation}, base_dir=REPO)
    ctx.tracking_uri, ctx.pipeline_name = uri, "seq"
    ctx.run_id = client.create_run(experiment, run_name="release").info.run_id
    out = register.run(spec, ctx)
    check_contract(spec, out)
    assert out.info["promoted"]
    from components.lib import models

    ids = torch.tensor([[1, 5, 9, 14]])
    got, _ = models.load_model(download_registered("models:/lstm-lm@champion", tmp_path / "cache", uri))
    want, tokenizer = models.load_model(folder)
    with torch.no_grad():
        assert torch.equal(got.eval()(ids).logits, want.eval()(ids).logits)
    import mlflow

    from components.lib.generation import generate_texts
    from components.lib.mlflow_models import tracking_to

    with tracking_to(uri):  # MLflow's own loader finds the class too, once llmcycle's library is imported
        served = mlflow.pyfunc.load_model("models:/lstm-lm@champion")
    [text] = served.predict(["The for statement"], params={"max_new_tokens": 4})
    [ours] = generate_texts(want, tokenizer, ["The for statement"], max_new_tokens=4)
    assert ours and text.strip() == ours.strip()  # its pipeline's greedy continuation is llmcycle's
