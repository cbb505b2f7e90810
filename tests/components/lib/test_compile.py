"""`trainer.compile`: what `auto` decides, and what compiling touches."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from components.lib.training import COMPILE_PROBE_STEPS, compile_trained, pays_back, should_compile


def test_auto_measures_fixed_shape_steps_and_never_compiles_changing_shapes():
    assert should_compile(True, False) is True and should_compile(False, True) is False
    assert should_compile("auto", fixed_shapes=True) is None  # measure first (AutoCompile)
    assert should_compile("auto", fixed_shapes=False) is False  # finetune's ragged batches recompile (0.11x)
    assert should_compile("auto", fixed_shapes=True, generates=True) is False  # ppo, grpo
    # 1,000 steps left at 1 s/step save 231 s at 1.3x: more than the CPU's expected compile; at 0.1 s/step no
    assert pays_back(1.0, 1000, "cpu") and not pays_back(0.1, 1000, "cpu")
    assert pays_back(0.1, 3000, "cuda") and not pays_back(0.1, 1000, "cuda")


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
