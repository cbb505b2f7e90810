"""What a step runs on: the Lightning Trainer settings (pipeline-wide, overridable per step) and where it runs.

A step's `trainer:` holds only what differs from the pipeline's `trainer:`; the two are merged field by
field (`resources_for`). A step whose devices x num_nodes exceeds one is launched under torchrun by the
engine, so strategies that start their own processes (`ddp_spawn`, `ddp_fork`, ...) are refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .section import Section
from .errors import did_you_mean

PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "bf16-true", "16-true",
              "64-true", "64", "transformer-engine", "transformer-engine-float16")
# Lightning strategies that run under an external launcher (torchrun); a test keeps this list inside
# Lightning's StrategyRegistry.
STRATEGIES = ("auto", "single_device", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
              "fsdp", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
              "deepspeed_stage_3_offload_nvme")
SELF_LAUNCHING = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # and their _find_unused_parameters_* variants
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class LauncherSpec(Section):
    """How the machines of a multi-node step meet: torchrun's c10d rendezvous."""

    rdzv_endpoint: str
    """`HOST:PORT` where every node's torchrun agent meets (HOST is one of the nodes, PORT free there)."""
    join_timeout: int = Field(900, ge=10)
    """Seconds to wait for every node to join before the step fails."""

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ENDPOINT.match(value):
            raise ValueError(f"expected HOST:PORT (e.g. 10.0.0.1:29400), got {value!r}")
        return value


class GenerationSettings(Section):
    """How steps decode text (evaluate's samples, tasks and references; ppo, grpo and collect rollouts), never what:
    greedy outputs are the same under every setting (components/lib/decoding.py)."""

    cache: Literal["auto", "dynamic", "static"] = "auto"
    """KV cache: `static` preallocates prompt + max_new_tokens positions (fixed shapes, what torch.compile needs),
    `dynamic` grows by one position per token; `auto`: static when decoding is compiled, else dynamic. Models
    without a transformers KV cache (mlp, rnn, lstm) keep their own state either way."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the per-token forward (with a static cache). `auto`: on CUDA only; on CPU the one-off compile
    (20-60 s on the 2-core bench machine) costs more than it saves unless a step decodes tens of thousands of
    tokens (benchmarks/bench_generate.py). `true`/`false` force it."""

    @model_validator(mode="after")
    def _compile_needs_static(self) -> "GenerationSettings":
        if self.compile is True and self.cache == "dynamic":
            raise ValueError("compile: true needs a static cache (compiled decoding keeps one shape); set cache: "
                             "static or auto, or compile: false")
        return self


class TrainerSpec(Section):
    """Lightning Trainer settings and the devices a step gets."""

    accelerator: str = "auto"
    """`auto`, `cpu`, `gpu`, `cuda` or `mps`."""
    devices: int | str = 1
    """Devices per node: a count, `auto` (every visible device), or a list of ids such as "0,1"."""
    strategy: str = "auto"
    """`auto`, `ddp`, `fsdp`, `deepspeed_stage_2`, ... (Lightning's names); more than one device runs under torchrun."""
    num_nodes: int = Field(1, ge=1)
    """Machines taking part in training; more than one needs `launcher`."""
    precision: str = "auto"
    """`auto` (bf16-mixed where the hardware has fast bf16, else 32-true), or any Lightning precision."""
    compile: bool | Literal["auto"] = "auto"
    """Compile the trained model with torch.compile (`nn.Module.compile`). `auto`: on kinds whose batches keep one
    shape (pretrain), time the first 20 steps and compile when the remaining steps would win the compile time
    back (components/lib/training.py `pays_back`); never on batches of changing shape (finetune's padded rows
    recompiled at every new shape and ran 10x slower) nor on ppo/grpo. `true`/`false` force it."""
    launcher: LauncherSpec | None = None
    """Rendezvous for `num_nodes` > 1 (run `llmcycle step SPEC STEP` on the other machines)."""
    share_devices: bool = False
    """Let steps that run at the same time use this step's GPUs too (default: a GPU serves one step at a time)."""
    generation: GenerationSettings = GenerationSettings()
    """KV cache and compile of the steps that generate text; a step's `trainer: {generation: ...}` changes only
    the fields it sets."""

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, value: str) -> str:
        return _one_of(value, ACCELERATORS, "accelerator")

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        return _one_of(value, PRECISIONS, "precision")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value.split("_find_unused")[0] in SELF_LAUNCHING:
            raise ValueError(f"strategy '{value}' starts its own processes; llmcycle launches a step with more than "
                             "one device under torchrun, so use 'ddp' (or fsdp, deepspeed_*)")
        return _one_of(value, STRATEGIES, "strategy")

    @field_validator("devices")
    @classmethod
    def _device_count(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"devices must be at least 1 (use accelerator: cpu for no GPU), got {value}")
            return value
        text = value.strip()
        if text == "auto" or re.fullmatch(r"\d+(\s*,\s*\d+)*,?", text):
            return text
        raise ValueError(f"devices: expected a count, 'auto' or a list of device ids such as \"0,1\", got {value!r}")

    def device_count(self) -> int | None:
        """Devices per node, or None for `auto` (every visible device)."""
        if isinstance(self.devices, int):
            return self.devices
        return None if self.devices == "auto" else len([d for d in self.devices.split(",") if d.strip()])

    def device_ids(self) -> list[int] | None:
        """Explicit device ids ("0,1"), or None when the count is what matters."""
        if isinstance(self.devices, str) and self.devices != "auto":
            return [int(d) for d in self.devices.split(",") if d.strip()]
        return None

    def world_size(self, visible: int = 1) -> int:
        """Processes the step trains with; `visible` resolves `devices: auto`."""
        return (self.device_count() or max(1, visible)) * self.num_nodes

    def wants_gpu(self, gpus_here: int) -> bool:
        """Whether the step claims GPUs (an explicit GPU accelerator, or auto on a machine that has them)."""
        return self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and gpus_here > 0)


class RunOnSpec(Section):
    """Run the step elsewhere: as a flow run of the `llmcycle-step` deployment on a Prefect work pool."""

    work_pool: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The pool; the engine runs deployment `llmcycle-step/<work_pool>` (declare it in prefect.yaml)."""
    job_variables: dict[str, Any] = {}
    """Passed to the pool's worker for this flow run (an image, resources, environment variables)."""


PLACEMENT_FIELDS = ("launcher", "share_devices")
"""Fields that say where a step runs, not what it computes: left out of its fingerprint."""


def resources_for(pipeline: TrainerSpec, step: TrainerSpec | None, trains: bool = True) -> TrainerSpec:
    """The pipeline's trainer with the fields the step sets replacing it.

    A kind that does not train runs as one process: the pipeline's devices and num_nodes (meant for its
    training steps) become one device on one node there.
    """
    merged = pipeline.model_dump()
    own = step.model_dump(exclude_unset=True) if step is not None else {}
    if "generation" in own:  # a section merged field by field, as the trainer itself is
        own["generation"] = {**merged["generation"], **own["generation"]}
    merged.update(own)
    if not trains:
        ids = TrainerSpec.model_validate(merged).device_ids()
        merged.update(devices=str(ids[0]) if ids else 1, num_nodes=1, strategy="auto", launcher=None)
    return TrainerSpec.model_validate(merged)


def resource_problems(step: TrainerSpec | None, merged: TrainerSpec, trains: bool) -> list[tuple[tuple, str]]:
    """(field path, message) for settings valid alone but not together; the path is under the step's
    `trainer:` when the step set the field, else under the pipeline's."""
    problems = []
    own = step.model_fields_set if step is not None else set()
    if merged.num_nodes > 1 and merged.launcher is None:
        problems.append((("num_nodes",) if "num_nodes" in own else ("pipeline", "num_nodes"),
                         f"num_nodes {merged.num_nodes} needs a launcher: add launcher: {{rdzv_endpoint: HOST:PORT}} "
                         "(torchrun's c10d rendezvous, where every node's agent meets)"))
    if merged.accelerator == "cpu" and merged.strategy.startswith(("fsdp", "deepspeed")):
        where = ("strategy",) if "strategy" in own or "accelerator" in own else ("pipeline", "strategy")
        problems.append((where, f"strategy '{merged.strategy}' needs GPUs (Lightning runs it on CUDA devices "
                                "only); on the CPU use ddp"))
    if not trains and "devices" in own and (step.device_count() or 2) > 1:
        problems.append((("devices",), "this step kind does not train, so it runs as one process on one device; "
                                       "more devices apply to training steps"))
    if not trains and "num_nodes" in own and step.num_nodes > 1:
        problems.append((("num_nodes",), "this step kind does not train, so it runs on one machine; num_nodes "
                                         "above 1 applies to training steps"))
    return problems


def _one_of(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} '{value}'{did_you_mean(value, known)}; expected one of {', '.join(known)}")
    return value
