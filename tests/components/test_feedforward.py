"""The feedforward kind: its data sets, what its networks learn on held-out data, its pictures and its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components import feedforward
from components.feedforward import data as datasets
from components.feedforward.network import load_network
from schemas.steps.feedforward import PLAYGROUND, FeedforwardSpec
from tests.conftest import check_contract, make_ctx


def spec(**fields) -> FeedforwardSpec:
    return FeedforwardSpec.model_validate({"kind": "feedforward", "frames": 0, **fields})


def train(tmp_path: Path, name: str, seed: int = 0, **fields):
    """Run the step on `fields`; return (spec, output, output folder), the contract checked."""
    s = spec(**fields)
    ctx = make_ctx(tmp_path, name=name, kind="feedforward", seed=seed)
    out = feedforward.run(s, ctx)
    check_contract(s, out)
    return s, out, ctx.out_dir


# -- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAYGROUND)
def test_playground_sets_have_their_shapes_labels_and_features(name):
    d = datasets.load_playground(name, 200, 0.0, 0.5, ["x", "y", "x2", "xy", "sin_x"], seed=3)
    x, y = d.train.tensors
    assert x.shape == (100, 5) and d.val_x.shape == (100, 5) and d.train_rows == 100
    assert set(y.tolist()) == set(d.val_y.tolist()) == {0, 1} and d.classes == ["orange", "blue"]
    assert torch.allclose(x[:, 2], x[:, 0] ** 2) and torch.allclose(x[:, 3], x[:, 0] * x[:, 1])
    assert torch.allclose(x[:, 4], torch.sin(x[:, 0]), atol=1e-6)
    assert d.plane.train_points.shape == (100, 2) and d.plane.axes == ("x", "y")


def test_xor_labels_are_the_quadrants_and_noise_moves_some():
    clean = datasets.load_playground("xor", 400, 0.0, 0.5, ["x", "y"], seed=0)
    x, y = clean.train.tensors
    assert torch.equal(y, (x[:, 0] * x[:, 1] >= 0).long())
    noisy = datasets.load_playground("xor", 400, 0.5, 0.5, ["x", "y"], seed=0)
    x, y = noisy.train.tensors
    wrong = (y != (x[:, 0] * x[:, 1] >= 0).long()).float().mean()
    assert 0.05 < wrong < 0.5


def test_generated_sets_follow_the_seed():
    for load in (lambda s: datasets.load_playground("spiral", 100, 0.2, 0.5, ["x", "y"], s),
                 lambda s: datasets.load_max(100, 0.0, 0.5, s), lambda s: datasets.load_coastline(100, 0.1, 0.5, s)):
        a, b, c = load(0), load(0), load(1)
        assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
        assert not torch.equal(a.val_x, c.val_x)
    first = [tuple(x.tolist()) for x, _ in datasets.CoastlineStream(5, 0.0, 0)]
    assert first == [tuple(x.tolist()) for x, _ in datasets.CoastlineStream(5, 0.0, 0)]


def test_max_targets_are_the_max():
    d = datasets.load_max(50, 0.0, 0.5, seed=0)
    x, y = d.train.tensors
    assert torch.allclose(y, x.max(1).values) and d.task == "regression" and d.classes is None
    assert (x >= 0).all() and (x <= 1).all()


def test_the_coastline_stream_is_never_materialised():
    stream = datasets.CoastlineStream(n=3000, noise=0.0, seed=0)
    assert isinstance(stream, torch.utils.data.IterableDataset) and not hasattr(stream, "__len__")
    loader = torch.utils.data.DataLoader(stream, batch_size=8)
    for i, (x, y) in enumerate(loader):
        assert stream.produced == 8 * i + len(y)  # drawn as consumed: no sample is read ahead or kept
        assert x.shape[1] == 2
    assert stream.produced == 3000
    assert all(isinstance(v, (int, float)) for v in vars(stream).values())  # settings and counters only
    lat, lon = torch.tensor(datasets.LATITUDE), torch.tensor(datasets.LONGITUDE)
    assert lat[0] <= x[:, 0].min() and x[:, 0].max() <= lat[1] and lon[0] <= x[:, 1].min() and x[:, 1].max() <= lon[1]
    sea, land = datasets.is_land(45.0, -5.9), datasets.is_land(45.0, -1.1)
    assert (int(sea), int(land)) == (0, 1)


def test_penguins_drop_and_count_missing_rows_and_standardize_on_training_rows():
    d = datasets.load_penguins(0.8, seed=0, task=None)
    assert d.dropped == 2 and d.train_rows + len(d.val_y) == 342  # 344 rows, 2 without measurements
    assert d.classes == ["Adelie", "Chinstrap", "Gentoo"] and d.val_x.shape[1] == 4
    x, _ = d.train.tensors
    assert np.allclose(d.shift, x.double().mean(0).numpy(), rtol=1e-5)
    everything = torch.cat([x, d.val_x]).double().mean(0).numpy()
    assert not np.allclose(d.shift, everything, rtol=1e-6)  # the held-out rows are not in the statistics
    scaled = (x.double() - torch.tensor(d.shift)) / torch.tensor(d.scale)
    assert torch.allclose(scaled.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5)


def write(tmp_path: Path, text: str, name: str = "rows.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_rows_missing_cells_and_task(tmp_path):
    path = write(tmp_path, "a,b,label,note\n1,2,x,n\n3,,y,n\n5,6,y,\n7,NA,x,n\n9,1,x,n\n")
    d = datasets.load_csv([path.name], "label", ["a", "b"], ",", 0.5, 0, None, lambda p: tmp_path / p)
    assert d.dropped == 2 and d.train_rows + len(d.val_y) == 3 and d.classes == ["x", "y"]
    assert d.feature_names == ["a", "b"] and d.plane is not None  # 2 features: pictures
    assert datasets.csv_task(["0", "1", "1"]) == "classification"
    assert datasets.csv_task(["0.5", "1.25", "3"]) == "regression"
    assert datasets.csv_task(["cat", "1"]) == "classification"


@pytest.mark.parametrize("text, features, task, message", [
    ("a,b,label\n1,2,x\n3,oops,y\n", None, None, ":3: column 'b' is 'oops', not a number"),
    ("a,b,label\n1,2,x\n1,2\n", None, None, ":3: 2 fields where the header has 3"),
    ("a,b,label\n1,2,x\n", ["a", "z"], None, ":1: no column 'z' in the header; columns: a, b, label"),
    ("a,b,label\n1,2,0.5\n3,4,big\n", None, "regression", ":3: label 'label' is 'big', not a number"),
    ("", None, None, ":1: empty file"),
])
def test_csv_errors_name_the_file_and_line(tmp_path, text, features, task, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        datasets.load_csv([path.name], "label", features, ",", 0.5, 0, task, lambda p: tmp_path / p)
    assert str(err.value).startswith(f"{path}:") and message in str(err.value)


@pytest.mark.parametrize("fields, message", [
    ({"data": {"builtin": "xor", "csv": {"files": ["a.csv"], "label": "y"}}}, "exactly one of builtin"),
    ({"data": {}}, "exactly one of builtin"),
    ({"data": {"builtin": "penguins", "n": 100}}, "n applies to generated sets"),
    ({"data": {"builtin": "coastline"}, "network": {"features": ["x", "x2"]}}, "network.features are Playground's"),
    ({"data": {"builtin": "max"}, "early_stopping": {"metric": "val/accuracy"}}, "needs classification"),
    ({"data": {"builtin": "xor"}, "epochs": 3, "max_steps": 10}, "epochs or max_steps, not both"),
    ({"data": {"builtin": "xor"}, "task": "regression"}, "task must be classification"),
    ({"data": {"builtin": "xor"}, "network": {"layers": [4, 0]}}, "hidden widths from 1 to 4096, got 0"),
])
def test_spec_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


# -- what the networks learn, on held-out data ----------------------------------------------------------

XOR = {"data": {"builtin": "xor", "n": 300}, "optimizer": {"name": "adam", "lr": 0.03}, "epochs": 30}


@pytest.fixture(scope="module")
def xor_relu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xor_relu")
    return train(tmp, "xor_relu", **XOR, network={"layers": [6, 4, 5], "activation": "relu"}, frames=3)


def test_relu_separates_xor_where_a_linear_network_cannot(xor_relu, tmp_path):
    _, relu, _ = xor_relu
    _, linear, _ = train(tmp_path, "xor_linear", **XOR, network={"layers": [6, 4, 5], "activation": "linear"})
    assert relu.metrics["val/accuracy"] >= 0.95 and relu.metrics["val/loss"] < 0.2
    # a line can do no better than cut off one quadrant (about 2/3); its loss stays near chance, ln 2
    assert linear.metrics["val/accuracy"] <= 0.75 and linear.metrics["val/loss"] > 0.6
    assert relu.metrics["val/accuracy"] - linear.metrics["val/accuracy"] >= 0.2
    assert relu.metrics["before/val/accuracy"] < 0.7 and relu.metrics["data/dropped_rows"] == 0


def test_every_weight_trained_and_the_saved_network_reloads_and_predicts_the_same(xor_relu):
    import lightning as L

    from components.feedforward.network import build_network

    s, out, folder = xor_relu
    network = load_network(folder / out.outputs["network"])
    assert network.config["features"] == ["x", "y"] and network.config["classes"] == ["orange", "blue"]
    d = datasets.load_playground("xor", 300, 0.0, 0.5, ["x", "y"], seed=0)
    probs = network.predict(d.val_x.numpy())
    assert probs.shape == (150, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert float((probs.argmax(1) == d.val_y.numpy()).mean()) == out.metrics["val/accuracy"]
    nll = -np.log(probs[np.arange(150), d.val_y.numpy()]).mean()
    assert nll == pytest.approx(out.metrics["val/loss"], rel=1e-4)
    L.seed_everything(0, verbose=False)  # the step's initial weights, rebuilt
    start = build_network(2, [6, 4, 5], 2, "relu").state_dict()
    trained = network.net.state_dict()
    changed = [k for k in start if "standardize" not in k and not torch.equal(start[k], trained[k])]
    assert len(changed) == 8  # four weight matrices and four bias vectors


def test_the_pictures_are_written_and_are_real_pngs(xor_relu):
    from PIL import Image

    _, _, folder = xor_relu
    for name in ("boundary.png", "boundary_frames.png", "loss_curve.png"):
        image = np.asarray(Image.open(folder / name).convert("RGB"))
        assert image.shape[0] >= 200 and image.shape[1] >= 300, name
        assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100, name  # not blank
    gif = Image.open(folder / "boundary_frames.gif")
    assert gif.n_frames == 3  # before training, halfway, at the end
    assert json.loads((folder / "metrics.json").read_text())["val/accuracy"] >= 0.95
    curve = json.loads((folder / "curve.json").read_text())
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 450 and "train/loss" in curve[-1]


def test_two_bias_free_relu_units_learn_max_and_show_the_formula(tmp_path):
    _, out, folder = train(tmp_path, "max_relu", seed=9, data={"builtin": "max", "n": 200},
                           network={"layers": [2], "activation": "relu", "bias": False},
                           optimizer={"name": "adam", "lr": 0.03}, epochs=80)
    assert out.metrics["val/loss"] < 1e-6 and out.metrics["val/mae"] < 1e-3 and out.metrics["params/total"] == 6
    network = load_network(folder / "network")
    assert network.predict(np.array([[3.0, 7.0], [7.0, 3.0]])) == pytest.approx([7.0, 7.0], abs=1e-3)  # the slide's 3,7
    quiz = json.loads((folder / "max_quiz.json").read_text())
    assert "a + relu(b - a)" in quiz["course"] and len(quiz["units"]) == 2
    # the two units are relu(a) (or relu(b)) and relu(b - a) (or relu(a - b)), up to a positive factor
    directions = sorted(tuple(np.round(np.array([u["w_a"], u["w_b"]]) / max(abs(u["w_a"]), abs(u["w_b"])), 2))
                        for u in quiz["units"])
    assert directions in ([(-1.0, 1.0), (1.0, 0.0)], [(0.0, 1.0), (1.0, -1.0)])


def test_early_stopping_stops_and_keeps_the_best_round(tmp_path):
    _, out, _ = train(tmp_path, "noisy", data={"builtin": "circle", "noise": 0.5, "n": 200},
                      network={"layers": [32, 32, 32], "activation": "relu"}, optimizer={"name": "adam", "lr": 0.01},
                      epochs=200, val_every=10, early_stopping={"patience": 5})
    m = out.metrics
    assert m["train/stopped_early"] == 1 and m["train/steps"] < 2000
    assert m["val/loss"] == pytest.approx(m["val/best_loss"], rel=1e-5)  # the best weights are the ones kept
    assert m["val/best_epoch"] == (m["train/steps"] - 5 * 10) / 10  # patience rounds after the best one


def test_the_coastline_streams_past_one_sample_at_a_time_and_the_map_fills_in(tmp_path):
    from PIL import Image

    _, out, folder = train(tmp_path, "coast", data={"builtin": "coastline", "n": 1500, "train_fraction": 0.8},
                           network={"layers": [16, 16], "activation": "relu"}, optimizer={"name": "sgd", "lr": 0.05},
                           batch_size=1, frames=4)
    m = out.metrics
    assert m["train/steps"] == m["train/samples"] == m["data/train_rows"] == 1200 and m["data/val_rows"] == 300
    assert m["val/accuracy"] >= 0.8 and m["val/accuracy"] > m["before/val/accuracy"] + 0.2
    assert Image.open(folder / "boundary_frames.gif").n_frames == 4
    assert (folder / "boundary.png").stat().st_size > 10_000


def test_penguins_reach_high_held_out_accuracy(tmp_path):
    _, out, _ = train(tmp_path, "penguins", data={"builtin": "penguins", "train_fraction": 0.8},
                      network={"layers": [10, 10], "activation": "relu"}, optimizer={"name": "adam", "lr": 0.01},
                      batch_size=16, epochs=30)
    assert out.metrics["val/accuracy"] >= 0.9 and out.metrics["data/dropped_rows"] == 2
    assert out.metrics["data/classes"] == 3 and out.metrics["data/features"] == 4


def test_a_csv_file_trains_with_its_task_inferred(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (120, 2))
    rows = [f"{a:.4f},{b:.4f},{'in' if a * a + b * b < 0.5 else 'out'}" for a, b in points]
    write(tmp_path, "u,v,where\n" + "\n".join(rows) + "\n", "points.csv")
    s = spec(data={"csv": {"files": ["*.csv"], "label": "where"}}, network={"layers": [8], "activation": "relu"},
             optimizer={"name": "adam", "lr": 0.03}, epochs=20)
    ctx = make_ctx(tmp_path, name="csv", kind="feedforward", base_dir=tmp_path)
    out = feedforward.run(s, ctx)
    check_contract(s, out)
    assert out.info["task"] == "classification" and out.info["classes"] == ["in", "out"]
    assert out.metrics["val/accuracy"] > 0.7 and (ctx.out_dir / "boundary.png").is_file()


# -- a shipped course spec, as a user runs it -------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_the_course_max_quiz_runs_end_to_end(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_shipped_spec, step_result

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_shipped_spec(tmp_path, "course/max-quiz.yaml", ["steps.max_relu.epochs=40"], extra=["--only", "max_relu"])

    result = step_result(tmp_path, "max_relu")
    assert result["metrics"]["val/loss"] < 1e-6 and result["outputs"] == {"network": "network"}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("course-max-quiz")
    [run] = client.search_runs(experiment.experiment_id, "tags.`llmcycle.step` = 'max_relu'")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"boundary.png", "boundary_frames.gif", "loss_curve.png", "max_quiz_weights.json", "network"} <= artifacts
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) >= 10  # Lightning's logger, every round
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 10
    assert "relu" in run.data.tags["feedforward.learned_formula"]
