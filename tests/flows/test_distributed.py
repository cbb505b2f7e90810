"""Steps on several processes and machines: torchrun on one node, two nodes meeting at a c10d rendezvous.

Both nodes run on this machine (gloo, CPU): `llmcycle run` plays the head node and `llmcycle step` the
second machine, exactly as the README's "Scaling out" tells users to start them on a cluster.
"""

from __future__ import annotations

import glob
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import cli, free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SPEC = """\
name: {name}
workdir: work
trainer: {{accelerator: cpu, precision: 32-true}}
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}, vocab_size: 400}}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {{family: llama, layers: 2, hidden: 32, heads: 2, context: 64}}
    optimizer: {{lr: 3.0e-3}}
    max_steps: 60
    val_every: 30
    batch_size: 8
    log_model: false
    trainer: {trainer}
"""
TOLERANCE = 1e-3  # relative; the same ranks see the same data and gloo sums in the same order, so it is ~exact


def llmcycle(*args: str, log: Path):
    return cli(*args, log=log)


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def result(folder: Path, step: str) -> dict:
    [path] = glob.glob(str(folder / "work" / step / "*" / "result.json"))
    return json.loads(Path(path).read_text())


def test_two_nodes_at_a_c10d_rendezvous_match_one_node_with_two_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "spec.yaml").write_text(SPEC.format(name="one", trainer="{devices: 2, strategy: ddp}"))
    endpoint = f"127.0.0.1:{free_port()}"
    (two / "spec.yaml").write_text(SPEC.format(
        name="two", trainer=f"{{devices: 1, num_nodes: 2, strategy: ddp, launcher: {{rdzv_endpoint: '{endpoint}', join_timeout: 180}}}}"))

    with llmcycle("run", str(one / "spec.yaml"), log=one / "run.log") as single:
        finished(single, one / "run.log")
    with llmcycle("run", str(two / "spec.yaml"), log=two / "head.log") as head, \
            llmcycle("step", str(two / "spec.yaml"), "lm", log=two / "node.log") as node:  # the "second machine"
        led = finished(head, two / "head.log")
        other = finished(node, two / "node.log")
    # Whichever reaches the step first runs it (rank 0's node) and the other joins its rendezvous.
    joined = [log for log in (led, other) if "lm: joining as a further node" in log]
    assert len(joined) == 1, (led[-2000:], other[-2000:])
    assert ("this node's part ended ok" if joined[0] is other else "llmcycle: step 'lm' complete") in other

    a, b = result(one, "lm")["metrics"], result(two, "lm")["metrics"]
    for m in (a, b):
        assert m["val/loss"] < m["before/val/loss"] - 0.3, m  # it learned
        assert m["train/tokens"] == 60 * 8 * 64 * 2  # two processes, each its own batches
    assert abs(a["val/loss"] - b["val/loss"]) / a["val/loss"] < TOLERANCE, (a["val/loss"], b["val/loss"])
    client = MlflowClient(f"sqlite:///{two / 'work' / 'mlflow.db'}")
    # If `llmcycle step` owned the step, the pipeline's own record of it afterwards is a cached run.
    [run] = client.search_runs([client.get_experiment_by_name("two").experiment_id],
                               "tags.`llmcycle.step` = 'lm' and tags.`llmcycle.cached` = 'no'")
    assert run.data.tags["llmcycle.world_size"] == "2" and run.info.status == "FINISHED"
    assert [x.step for x in client.get_metric_history(run.info.run_id, "val/loss")][0] == 0  # rank 0 logged


def test_ppo_trains_under_torchrun_with_two_processes(tmp_path):
    spec = tmp_path / "ppo.yaml"
    spec.write_text(SPEC.format(name="ppo2", trainer="{}").replace("max_steps: 60", "max_steps: 10") + """\
  ppo:
    kind: ppo
    policy: lm
    reward: {function: exact_match}
    prompts: {builtin: tasks, n_per_task: 8, tasks: [sentiment]}
    iterations: 2
    rollouts: 8
    max_new_tokens: 4
    trainer: {devices: 2, strategy: ddp}
""")
    with llmcycle("run", str(spec), log=tmp_path / "run.log") as proc:
        out = finished(proc, tmp_path / "run.log")
    assert "ppo: iteration 2/2" in out
    got = result(tmp_path, "ppo")
    assert "val/true_reward" in got["metrics"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ppo2").experiment_id], "tags.`llmcycle.step` = 'ppo'")
    assert run.data.tags["llmcycle.world_size"] == "2"
    from transformers import AutoModelForCausalLM

    [folder] = glob.glob(str(tmp_path / "work" / "ppo" / "*" / "model"))
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2
