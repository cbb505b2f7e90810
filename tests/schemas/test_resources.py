"""Per-step `trainer:` settings: merged over the pipeline's, checked before anything runs, with line numbers."""

from __future__ import annotations

import pytest

import schemas
from schemas.resources import STRATEGIES, TrainerSpec, resources_for

SPEC = """\
name: res
trainer: {precision: 32-true, devices: 2}
steps:
  tok: {kind: tokenize, corpus: {builtin: pydoc}}
  base:
    kind: pretrain
    tokenizer: tok
    model: {family: llama}
    trainer: {accelerator: gpu, strategy: ddp}
"""


def problems(write_spec, text: str) -> list[str]:
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(write_spec(text))
    return [str(p).split(": ", 1)[1] for p in err.value.problems]


def test_a_step_changes_only_the_fields_it_sets_and_kinds_that_do_not_train_get_one_device(write_spec):
    loaded = schemas.load(write_spec(SPEC))
    base = loaded.resources("base")
    assert (base.accelerator, base.devices, base.strategy, base.precision) == ("gpu", 2, "ddp", "32-true")
    tok = loaded.resources("tok")
    assert (tok.accelerator, tok.devices, tok.num_nodes, tok.precision) == ("auto", 1, 1, "32-true")


@pytest.mark.parametrize("trainer, line_col, message", [
    ("{devices: 0}", "9:24", "devices must be at least 1"),
    ("{devices: 'two'}", "9:24", "devices: expected a count, 'auto' or a list of device ids"),
    ("{strategy: dpp}", "9:25", "unknown strategy 'dpp' (did you mean 'ddp'?)"),
    ("{strategy: ddp_spawn}", "9:25", "strategy 'ddp_spawn' starts its own processes"),
    ("{num_nodes: 2}", "9:26", "num_nodes 2 needs a launcher: add launcher: {rdzv_endpoint: HOST:PORT}"),
    ("{num_nodes: 2, launcher: {rdzv_endpoint: head}}", "9:55", "expected HOST:PORT"),
    ("{accelerator: cpu, strategy: fsdp}", "9:43", "strategy 'fsdp' needs GPUs"),
    ("{precision: bf17-mixed}", "9:26", "unknown precision 'bf17-mixed'"),
])
def test_invalid_resources_are_spec_errors_at_their_line(write_spec, trainer, line_col, message):
    path = write_spec(SPEC.replace("{accelerator: gpu, strategy: ddp}", trainer))
    with pytest.raises(schemas.SpecError) as err:
        schemas.load(path)
    [problem] = err.value.problems
    assert str(problem).startswith(f"{path}:{line_col}: steps.base.trainer."), str(problem)
    assert message in str(problem)


def test_a_kind_that_does_not_train_cannot_ask_for_several_devices(write_spec):
    text = SPEC.replace("  tok: {kind: tokenize, corpus: {builtin: pydoc}}",
                        "  tok: {kind: tokenize, corpus: {builtin: pydoc}, trainer: {devices: 4}}")
    [message] = problems(write_spec, text)
    assert message.startswith("steps.tok.trainer.devices: this step kind does not train")


def test_the_pipeline_level_launcher_problem_is_reported_once(write_spec):
    text = SPEC.replace("trainer: {precision: 32-true, devices: 2}", "trainer: {num_nodes: 3}")
    assert problems(write_spec, text) == ["trainer.num_nodes: num_nodes 3 needs a launcher: add launcher: "
                                          "{rdzv_endpoint: HOST:PORT} (torchrun's c10d rendezvous, where every "
                                          "node's agent meets)"]


def test_device_counts_and_world_size():
    assert TrainerSpec(devices="0,2").device_ids() == [0, 2] and TrainerSpec(devices="0,2").world_size() == 2
    assert TrainerSpec(devices="auto", num_nodes=3).world_size(visible=4) == 12
    assert TrainerSpec(accelerator="auto").wants_gpu(gpus_here=0) is False
    assert TrainerSpec(accelerator="auto").wants_gpu(gpus_here=2) is True
    merged = resources_for(TrainerSpec(devices=4, strategy="ddp"), TrainerSpec(precision="bf16-mixed"))
    assert (merged.devices, merged.strategy, merged.precision) == (4, "ddp", "bf16-mixed")


def test_every_strategy_we_accept_is_one_lightning_knows():
    from lightning.pytorch.strategies import StrategyRegistry

    assert set(STRATEGIES) - {"auto"} <= set(StrategyRegistry.available_strategies())
