"""distill: the loss against ALGORITHMS.md §9 and TRL, a tiny teacher distilled end to end, tokenizer checks, the
shipped spec."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import check_contract, finish, make_ctx

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

REPO = Path(__file__).resolve().parents[2]
TEACHER = {"family": "llama", "layers": 2, "hidden": 64, "heads": 4, "context": 64}
STUDENT = {"family": "llama", "layers": 1, "hidden": 32, "heads": 2, "context": 64}
CHECK1 = (torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[math.log(3), 0.0]]]))  # student, teacher; p_T = [.75, .25]


# -- the loss ---------------------------------------------------------------------------------------


def test_hinton_loss_matches_the_hand_computed_check():
    from components.distill import distillation_loss, generalized_jsd

    student, teacher, label = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0, 0.0, -2.0]]), torch.tensor([0])
    assert generalized_jsd(student, teacher, temperature=2.0).item() == pytest.approx(0.060269, abs=1e-6)
    loss, soft, hard = distillation_loss(student, teacher, label, temperature=2.0, alpha=0.5)
    assert 4 * soft.item() == pytest.approx(0.241076, abs=1e-6)
    assert hard.item() == pytest.approx(0.407606, abs=1e-6)
    assert loss.item() == pytest.approx(0.324341, abs=1e-6)
    loss, _, hard = distillation_loss(student, teacher, label, temperature=2.0, alpha=0.5, hard_labels=False)
    assert hard.item() == 0 and loss.item() == pytest.approx(0.5 * 0.241076, abs=1e-6)


@pytest.mark.parametrize("beta,temperature,want", [(0, 1, 0.130812), (1, 1, 0.143841), (0.5, 1, 0.033822),
                                                   (0.1, 1, 0.011831), (0.9, 1, 0.012752), (0, 2, 0.036341)])
def test_generalized_jsd_matches_trl_and_the_check(beta, temperature, want):
    from trl.experimental.gkd import GKDTrainer

    from components.distill import generalized_jsd

    student, teacher = CHECK1
    ours = generalized_jsd(student, teacher, beta=beta, temperature=temperature).item()
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature).item()
    assert ours == pytest.approx(want, abs=1e-6) and ours == pytest.approx(theirs, abs=1e-6)


def test_generalized_jsd_averages_over_the_scored_positions_as_trl():
    from trl.experimental.gkd import GKDTrainer

    from components.distill import generalized_jsd

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, 4, 5, 6, 0]])
    for beta in (0.0, 0.5, 1.0):
        ours = generalized_jsd(student, teacher, labels != -100, beta=beta)
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # check 2 of ALGORITHMS.md §9: only the position with a label counts
    two = torch.tensor([[[math.log(3), 0.0], [5.0, 0.0]]])
    assert generalized_jsd(torch.zeros(1, 2, 2), two, torch.tensor([[True, False]])).item() == \
        pytest.approx(0.130812, abs=1e-6)


# -- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tokenized, tmp_path_factory):
    """A tiny llama pretrained 40 steps on the pydoc tokens, as a pretrain step's result."""
    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec

    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", model=TEACHER, max_steps=40, val_every=40,
                        batch_size=8, val_batches=2, optimizer={"lr": 3e-3}, log_model=False)
    ctx = make_ctx(tmp_path_factory.mktemp("teacher"), name="teacher", kind="pretrain",
                   upstream={"tokenizer": tokenized})
    return finish(ctx, pretrain.run(spec, ctx))


def distill_spec(**kw):
    from schemas.steps.distill import DistillSpec

    base = dict(kind="distill", teacher="teacher", student=STUDENT, tokenizer="tokenizer", max_steps=30,
                val_every=15, batch_size=8, val_batches=2, checkpoint_every=30, optimizer={"lr": 3e-3},
                latency={"new_tokens": 8, "repeats": 1}, log_model=False)
    return DistillSpec(**{**base, **kw})


def test_distilled_student_learns_loads_and_is_reported_beside_teacher_and_twin(tmp_path, tokenized, teacher):
    """A saved untrained student (so every parameter can be compared), on-policy batches included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components import distill
    from components.lib.models import build_model, load_tokenizer, save_pretrained
    from schemas.steps.pretrain import ModelSpec

    torch.manual_seed(0)
    start = save_pretrained(build_model(ModelSpec(**STUDENT), load_tokenizer(tokenized.path("tokenizer")), "causal"),
                            load_tokenizer(tokenized.path("tokenizer")), tmp_path / "student0")
    spec = distill_spec(student=str(start), on_policy={"lmbda": 0.5, "max_new_tokens": 8, "beta": 0.5})
    ctx = make_ctx(tmp_path, name="distilled", kind="distill", upstream={"tokenizer": tokenized, "teacher": teacher})
    out = distill.run(spec, ctx)
    m = out.metrics
    check_contract(spec, out)
    assert m["val/loss"] < m["before/val/loss"] - 0.5, m
    assert m["hard/val/loss"] < m["before/val/loss"] - 0.5, m
    for who in ("", "teacher/", "hard/"):
        assert math.isfinite(m[f"{who}val/perplexity"]) and m[f"{who}val/perplexity"] > 1, m
        assert m[f"{who}val/perplexity"] == pytest.approx(math.exp(m[f"{who}val/loss"]))
    assert m["teacher/val/perplexity"] < m["val/perplexity"], m  # a 40-step teacher still beats a 30-step student
    assert 0 < m["params/ratio"] < 1 and 0 < m["perf/size_ratio"] < 1 and m["perf/latency_ratio"] > 0, m
    assert 0 < m["train/on_policy_fraction"] < 1 and m["train/steps"] == 30

    folder = ctx.out_dir / out.outputs["model"]
    assert (folder / "model.safetensors").is_file()
    model, before = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(start)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == 32 and len(tok) == len(load_tokenizer(tokenized.path("tokenizer")))
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, dict(before.named_parameters())[n])]
    assert not unchanged, unchanged


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path, tokenized, teacher):
    from components import distill
    from components.lib.models import load_tokenizer

    other = tmp_path / "other_teacher"
    shutil.copytree(teacher.path("model"), other)
    tok = load_tokenizer(other)
    tok.add_tokens(["zzqx"])
    tok.save_pretrained(other)
    ctx = make_ctx(tmp_path, name="distilled", kind="distill", upstream={"tokenizer": tokenized})
    with pytest.raises(ValueError, match=r"teacher '/.*other_teacher': its tokenizer \(\d+ tokens\) is not the one "
                                         r"of tokenize step 'tokenizer'"):
        distill.run(distill_spec(teacher=str(other)), ctx)
    assert not (ctx.ckpt_dir / "distill").exists()  # nothing trained


# -- the spec -----------------------------------------------------------------------------------------


def test_a_teacher_trained_on_another_tokenize_step_is_a_spec_error(write_spec):
    import schemas
    from schemas.errors import SpecError

    path = write_spec("""\
        name: mismatch
        steps:
          tok: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 512}
          tok_big: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 1024}
          teacher: {kind: pretrain, tokenizer: tok_big, model: {layers: 2}}
          same: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 1024}
          small:
            kind: distill
            teacher: teacher
            student: {family: llama, layers: 1, hidden: 32, heads: 2}
            tokenizer: tok
          fine: {kind: distill, teacher: teacher, student: {layers: 1}, tokenizer: same}
        """)
    with pytest.raises(SpecError) as err:
        schemas.load(path)
    [problem] = err.value.problems
    assert problem.path == "steps.small.teacher" and problem.line == 9
    assert "teacher 'teacher' was trained on the tokenizer of step 'tok_big', but this step's tokenizer is 'tok'" \
        in problem.message and "set tokenizer: tok_big" in problem.message


def test_student_errors_name_the_field(write_spec):
    import schemas
    from schemas.errors import SpecError

    path = write_spec("""\
        name: bad
        steps:
          tok: {kind: tokenize, corpus: {builtin: pydoc}}
          teacher: {kind: pretrain, tokenizer: tok, model: {layers: 2}}
          a: {kind: distill, teacher: teacher, student: {layerz: 1}, tokenizer: tok}
          b: {kind: distill, teacher: teacher, student: nowhere, tokenizer: tok}
          c: {kind: distill, teacher: teacher, student: {context: 16}, tokenizer: tok, on_policy: {max_new_tokens: 16}}
        """)
    with pytest.raises(SpecError) as err:
        schemas.load(path)
    got = {p.path: p.message for p in err.value.problems}
    assert got["steps.a.student.layerz"].startswith("unknown key 'layerz'")
    assert got["steps.b.student"].startswith("no step named 'nowhere'")
    assert "on_policy.max_new_tokens (16) must be below student.context (16)" in got["steps.c"]
    assert len(got) == 3, got


# Each step keeps its kind and wiring; sizes shrink (and fp32, faster than bf16 autocast at this width).
SHORTER = ["trainer.precision=32-true", "steps.tokenizer.vocab_size=512",
           "steps.teacher.max_steps=30", "steps.teacher.val_every=30", "steps.teacher.batch_size=8",
           "steps.teacher.model.layers=2", "steps.teacher.model.hidden=64", "steps.teacher.model.context=64",
           "steps.teacher.log_model=false", "steps.distilled.student.layers=1",
           "steps.distilled.max_steps=20", "steps.distilled.val_every=20", "steps.distilled.batch_size=8",
           "steps.distilled.val_batches=2", "steps.distilled.student.hidden=32", "steps.distilled.student.context=64",
           "steps.distilled.latency.new_tokens=4", "steps.distilled.latency.repeats=1"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_shipped_spec_runs_end_to_end_shortened(tmp_path, monkeypatch):
    import glob
    import json

    from transformers import AutoModelForCausalLM

    from flows.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "distill.yaml"
    spec.write_text((REPO / "specs" / "distill.yaml").read_text())
    assert main(["run", str(spec), *sum((["--set", s] for s in SHORTER), [])]) == 0
    [result] = glob.glob(str(tmp_path / "runs" / "distilled" / "*" / "result.json"))
    data = json.loads(Path(result).read_text())
    m = data["metrics"]
    assert m["val/loss"] < m["before/val/loss"] and m["hard/val/loss"] < m["before/val/loss"], m
    assert {"teacher/val/perplexity", "hard/val/perplexity", "perf/latency_ratio", "params/ratio"} <= set(m)
    AutoModelForCausalLM.from_pretrained(Path(result).parent / data["outputs"]["model"])
