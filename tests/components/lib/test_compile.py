"""`trainer.compile`: what `auto` decides, and what compiling touches."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from components.lib import training
from components.lib.training import COMPILE_PROBE_STEPS, compile_trained, should_compile, uncompile, worth_trying


def test_auto_measures_fixed_shape_steps_and_never_compiles_changing_shapes():
    assert should_compile(True, False) is True and should_compile(False, True) is False
    assert should_compile("auto", fixed_shapes=True) is None  # measure first (AutoCompile)
    assert should_compile("auto", fixed_shapes=False) is False  # finetune's ragged batches recompile (0.11x)
    assert should_compile("auto", fixed_shapes=True, generates=True) is False  # ppo, grpo
    # a try risks at most 5% of the time left: 1,000 steps at 1 s/step (50 s) cover the CPU's 40 s compile
    assert worth_trying(1.0, 1000, "cpu") and not worth_trying(0.1, 1000, "cpu")
    assert worth_trying(0.1, 12_000, "cuda") and not worth_trying(0.1, 11_000, "cuda")


def test_a_short_pretrain_times_its_steps_and_stays_eager(tmp_path, tokenized, capsys):
    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec
    from tests.conftest import make_ctx

    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", max_steps=COMPILE_PROBE_STEPS + 4, batch_size=4,
                        model={"family": "llama", "layers": 1, "hidden": 32, "heads": 2, "context": 32})
    ctx = make_ctx(tmp_path, name="base", kind="pretrain", upstream={"tokenizer": tokenized})
    pretrain.run(spec, ctx)
    said = capsys.readouterr().out
    assert "base: compile auto: 3 steps left at" in said and "staying eager" in said


@pytest.mark.parametrize("keep", [True, False], ids=["faster-kept", "slower-reverted"])
def test_auto_times_the_compiled_steps_and_keeps_them_only_when_faster(tmp_path, tokenized, capsys, monkeypatch,
                                                                       keep):
    """A pretrain long enough to try: compiled for real, timed, then kept or (when not faster) run eagerly to
    the end; either way the run finishes and its model loads. The bar is moved so that each outcome is forced."""
    from transformers import AutoModelForCausalLM

    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec
    from tests.conftest import make_ctx

    monkeypatch.setattr(training, "COMPILE_SECONDS", {"cpu": 0.0, "cuda": 0.0})  # always worth a try here
    monkeypatch.setattr(training, "COMPILE_KEEP", 1e6 if keep else 0.0)
    steps = 2 * COMPILE_PROBE_STEPS + 6
    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", max_steps=steps, batch_size=4, log_model=False,
                        model={"family": "llama", "layers": 1, "hidden": 32, "heads": 2, "context": 32})
    ctx = make_ctx(tmp_path, name="base", kind="pretrain", upstream={"tokenizer": tokenized})
    out = pretrain.run(spec, ctx)
    said = capsys.readouterr().out
    assert "compiling model and timing it" in said
    assert ("keeping them" in said) == keep and ("back to eager" in said) == (not keep), said
    assert out.metrics["train/loss"] == out.metrics["train/loss"]  # finite after the switch
    assert out.metrics["perf/compile_speedup"] > 0  # measured, kept or not
    AutoModelForCausalLM.from_pretrained(ctx.out_dir / out.outputs["model"])


def test_uncompile_puts_the_eager_call_back():
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

    module, x = Module(), torch.randn(2, 4)
    compile_trained(module)
    assert module.net._compiled_call_impl is not None
    uncompile(module, ["net"])
    assert module.net._compiled_call_impl is None and torch.equal(module.net(x), x @ module.net.weight.T
                                                                  + module.net.bias)


def test_compiling_keeps_the_parameter_names_and_skips_frozen_networks():
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy, self.reference = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).requires_grad_(False)

    module = Module()
    names = list(module.state_dict())
    assert compile_trained(module) == ["policy"]
    assert list(module.state_dict()) == names  # checkpoints and saved folders are unchanged
    assert module.policy._compiled_call_impl is not None and module.reference._compiled_call_impl is None


def test_the_spec_takes_auto_true_or_false():
    from pydantic import ValidationError

    from schemas.resources import TrainerSpec

    assert TrainerSpec().compile == "auto" and TrainerSpec(compile=True).compile is True
    with pytest.raises(ValidationError):
        TrainerSpec(compile="sometimes")
