"""The scheduler's rules: inputs first, at most max_parallel at once, a device (GPU or the CPU) serves one step
unless shared, failures skip downstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.plan import PlannedStep
from flows.scheduler import Scheduler


def step(name: str, deps: tuple[str, ...] = (), **trainer) -> PlannedStep:
    resources = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": "auto",
                 "compile": "auto", "launcher": None, "share_devices": False, **trainer}
    return PlannedStep(name=name, kind="pretrain", deps=list(deps), fingerprint=name * 8, output_dir=Path(name),
                       cached=False, resources=resources)


def names(started) -> list[str]:
    return [s.step.name for s in started]


def gpus(started) -> list[tuple[str, str | None]]:
    return [(s.step.name, s.cuda_devices) for s in started]


def test_ready_steps_start_together_up_to_max_parallel():
    shared = dict(share_devices=True)
    sched = Scheduler([step("a"), step("b", ("a",), **shared), step("c", ("a",), **shared),
                       step("d", ("a",), **shared)], max_parallel=2, cores=4)
    assert names(sched.start()) == ["a"]
    assert sched.start() == []  # b, c, d wait for a
    sched.end("a", ok=True)
    started = sched.start()
    assert names(started) == ["b", "c"]  # d waits for a free slot
    assert [s.cpu_threads for s in started] == [4, 2]  # c shares the cores with b (b started alone)
    sched.end("c", ok=True)
    assert names(sched.start()) == ["d"]


def test_cpu_steps_take_turns_unless_they_share_the_cpu():
    sched = Scheduler([step("a"), step("b"), step("c", share_devices=True), step("d", share_devices=True)],
                      max_parallel=4, cores=2)
    assert names(sched.start()) == ["a"]  # b waits for the CPU; c and d share, but not with a step that does not
    sched.end("a", ok=True)
    assert names(sched.start()) == ["b"]
    sched.end("b", ok=True)
    started = sched.start()
    assert names(started) == ["c", "d"] and [s.cpu_threads for s in started] == [2, 1]


def test_a_gpu_serves_one_step_at_a_time_unless_shared():
    gpu = dict(accelerator="gpu")
    sched = Scheduler([step("a", **gpu), step("b", **gpu), step("c", **gpu, share_devices=True), step("d")],
                      max_parallel=4, gpus=["0"])
    assert gpus(sched.start()) == [("a", "0"), ("d", None)]  # b and c wait for GPU 0 (a does not share it)
    sched.end("a", ok=True)
    assert gpus(sched.start()) == [("b", "0")]


def test_steps_get_distinct_devices_and_explicit_ids():
    sched = Scheduler([step("two", accelerator="gpu", devices=2), step("third", accelerator="gpu", devices="2"),
                       step("late", accelerator="gpu", devices=2)], max_parallel=4, gpus=["0", "1", "2", "3"])
    assert gpus(sched.start()) == [("two", "0,1"), ("third", "2")]
    sched.end("two", ok=True)
    assert gpus(sched.start()) == [("late", "0,1")]


def test_asking_for_more_gpus_than_the_machine_has_fails_before_anything_runs():
    with pytest.raises(ValueError, match=r"step 'big' asks for 8 GPU\(s\) and this machine shows 2 \(0,1\)"):
        Scheduler([step("big", accelerator="gpu", devices=8)], max_parallel=2, gpus=["0", "1"])
    with pytest.raises(ValueError, match="asks for GPUs 3 and this machine shows 0"):
        Scheduler([step("pinned", accelerator="cuda", devices="3")], max_parallel=2, gpus=[])


def test_a_failure_skips_what_depends_on_it_and_the_other_branches_go_on():
    shared = dict(share_devices=True)
    sched = Scheduler([step("a"), step("bad", ("a",), **shared), step("after", ("bad",), **shared),
                       step("other", ("a",), **shared)], max_parallel=4)
    sched.start()
    sched.end("a", ok=True)
    assert names(sched.start()) == ["bad", "other"]
    sched.end("bad", ok=False)
    assert sched.start() == [] and sched.skipped == {"after"}
    sched.end("other", ok=True)
    assert sched.finished
