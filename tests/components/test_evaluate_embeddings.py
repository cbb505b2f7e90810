"""evaluate, inside the model: sentence vectors and a probe, analogies, the projector export, random vectors against
dimension, attention maps and previous-token scores; the course specs embeddings.yaml and attention.yaml."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import check_contract, make_ctx


def evaluate(tmp_path, **kw):
    from components import evaluate as component
    from schemas.steps.evaluate import EvaluateSpec

    spec = EvaluateSpec(kind="evaluate", **kw)
    ctx = make_ctx(tmp_path, name="eval", kind="evaluate")
    out = component.run(spec, ctx)
    check_contract(spec, out)
    return ctx, out


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_the_probe_beats_the_majority_class_on_separable_vectors():
    from components.evaluate.sentences import probe

    g = torch.Generator().manual_seed(0)
    labels = ["pos"] * 70 + ["neg"] * 30
    centre = torch.zeros(16)
    centre[3] = 3.0
    x = torch.randn(100, 16, generator=g) + torch.stack([centre if v == "pos" else -centre for v in labels])
    rows = [{"label": v} for v in labels]
    held = list(range(0, 100, 4))
    train = [i for i in range(100) if i not in held]
    figures = probe(x[train], [rows[i] for i in train], x[held], [rows[i] for i in held], l2=1e-3)
    majority = sum(labels[i] == "pos" for i in held) / len(held)  # "pos" is the training split's commonest label
    assert figures["majority"] == pytest.approx(majority)
    assert figures["accuracy"] >= 0.95 > majority and figures["train_accuracy"] >= 0.95
    assert (figures["train_texts"], figures["eval_texts"]) == (75, 25)


def test_random_vectors_mean_abs_cos_follows_one_over_sqrt_d_and_sums_come_apart():
    from components.evaluate import dimensions

    curves = dimensions.measure([1, 2, 16, 64, 256, 1024], pairs=4000, summed=5, dictionary=500, seed=0)
    assert curves["expected"][:2] == pytest.approx([1.0, 2 / math.pi])  # d = 1: cos = +-1; d = 2: E|cos| = 2/pi
    for d, measured, exact in zip(curves["dims"], curves["abs_cos"], curves["expected"]):
        assert measured == pytest.approx(exact, rel=0.05), d
        if d >= 64:
            assert exact == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.01)
    slope = math.log(curves["abs_cos"][-1] / curves["abs_cos"][-3]) / math.log(1024 / 64)
    assert slope == pytest.approx(-0.5, abs=0.05)  # ~ 1 / sqrt(d)
    assert curves["recovery"][0] < 0.5 < 0.99 < curves["recovery"][-1]


def test_labelled_texts_from_csv_and_jsonl_and_a_row_without_its_column(tmp_path):
    from components.evaluate.sentences import load_texts
    from schemas.steps.evaluate_inspection import SentencesSpec

    (tmp_path / "t.csv").write_text("review,stars\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    train, held = load_texts(SentencesSpec(file="t.csv", text_column="review", label_column="stars"), 0,
                             lambda p: tmp_path / p)
    assert len(train) + len(held) == 20 and held and {r["label"] for r in train} == {"0", "1"}
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(9))
                                      + json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:10: no 'label' .*columns: label, text"):
        load_texts(SentencesSpec(file="t.jsonl"), 0, lambda p: tmp_path / p)
    reviews_train, reviews_eval = load_texts(SentencesSpec(builtin="reviews", n_per_split=500), 0, None)
    assert not {r["text"] for r in reviews_train} & {r["text"] for r in reviews_eval}  # distinct noun/adjective pairs
    assert len(reviews_train) + len(reviews_eval) == 400  # every pair of the sentiment task, once


def test_sections_reject_what_they_cannot_use():
    from pydantic import ValidationError

    from schemas.steps.evaluate import EmbeddingsSpec

    with pytest.raises(ValidationError, match="expected the form 'a - b \\+ c = d'"):
        EmbeddingsSpec(analogies=["king-man+woman=queen"])
    with pytest.raises(ValidationError, match="text_column: file only"):
        EmbeddingsSpec(sentences={"builtin": "reviews", "text_column": "body"})
    with pytest.raises(ValidationError, match="give exactly one of builtin"):
        EmbeddingsSpec(sentences={})


def test_analogies_sentences_projector_and_dimensions(tmp_path, tiny_lm):
    from google.protobuf import text_format

    from components.lib.models import load_model

    model, tok = load_model(tiny_lm)
    ids = {w: tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("the", "for", "in", "class")}
    assert all(len(v) == 1 for v in ids.values())
    unit = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    with torch.no_grad():  # plant the answer: class = the - for + in, on unit vectors
        model.get_input_embeddings().weight[ids["class"][0]] = unit[ids["the"]] - unit[ids["for"]] + unit[ids["in"]]
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ctx, out = evaluate(tmp_path, model=str(folder), embeddings={
        "plot_tokens": 20, "k": 3, "analogies": ["the - for + in = class", "for - the + class = in"],
        "sentences": {"builtin": "reviews", "n_per_split": 40, "queries": ["Review: the soup was great."]},
        "projector": {"tokens": 100}, "dimensions": {"dims": [2, 64], "pairs": 200, "dictionary": 50}})
    m = out.metrics
    rows = [json.loads(r) for r in lines(ctx.out_dir / "analogies.jsonl")]
    assert rows[0]["rank"] == 1 and rows[0]["solved"] and rows[0]["answers"][0] == " class"
    assert m["embeddings/analogies/solved"] == sum(r["solved"] for r in rows) / 2
    assert m["embeddings/analogies/count"] == 2 and len(rows[1]["answers"]) == 3
    assert 0 <= m["embeddings/probe/accuracy"] <= 1 and m["embeddings/probe/eval_texts"] <= 40
    assert "fresh/embeddings/probe/accuracy" in m
    near = [json.loads(r) for r in lines(ctx.out_dir / "sentence_neighbours.jsonl")]
    assert len(near) == 3 and near[0]["cosine"] >= near[-1]["cosine"]
    # the projector's files: as many vectors as metadata rows (after the header), and a config that parses
    projector = ctx.out_dir / "projector"
    for name, width in (("tokens", 64), ("sentences", 64)):
        vectors = lines(projector / f"{name}.tsv")
        assert len(lines(projector / f"{name}_metadata.tsv")) == len(vectors) + 1
        assert {len(v.split("\t")) for v in vectors} == {width}
    assert len(lines(projector / "tokens.tsv")) == 100
    assert len(lines(projector / "sentences.tsv")) == m["embeddings/probe/train_texts"] + m["embeddings/probe/eval_texts"]
    config = text_format.Parse((projector / "projector_config.pbtxt").read_text(), projector_config_message())
    assert [(e.tensor_name, e.tensor_path, list(e.tensor_shape)) for e in config.embeddings] == [
        ("tokens", "tokens.tsv", [100, 64]), ("sentences", "sentences.tsv", [len(lines(projector / "sentences.tsv")), 64])]
    assert all((projector / e.metadata_path).is_file() for e in config.embeddings)
    assert m["embeddings/dimensions/random_abs_cos"] == pytest.approx(math.sqrt(2 / (math.pi * 64)), rel=0.2)
    assert (ctx.out_dir / "dimensions.png").stat().st_size > 10_000


def projector_config_message():
    """An empty tensorboard.projector.ProjectorConfig, its descriptor written from TensorBoard's
    tensorboard/plugins/projector/projector_config.proto (TensorBoard is not a dependency; protobuf, MLflow's, is)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="projector_config.proto", package="tensorboard.projector",
                                               syntax="proto3")
    sprite = proto.message_type.add(name="SpriteMetadata")
    sprite.field.add(name="image_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    sprite.field.add(name="single_image_dim", number=2, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    info = proto.message_type.add(name="EmbeddingInfo")
    for name, number in (("tensor_name", 1), ("metadata_path", 2), ("bookmarks_path", 3), ("tensor_path", 6)):
        info.field.add(name=name, number=number, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    info.field.add(name="tensor_shape", number=4, type=F.TYPE_UINT32, label=F.LABEL_REPEATED)
    info.field.add(name="sprite", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                   type_name=".tensorboard.projector.SpriteMetadata")
    config = proto.message_type.add(name="ProjectorConfig")
    config.field.add(name="model_checkpoint_path", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    config.field.add(name="embeddings", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=".tensorboard.projector.EmbeddingInfo")
    config.field.add(name="model_checkpoint_dir", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorboard.projector.ProjectorConfig"))()


def previous_token_gpt2(tok, folder):
    """A one-layer GPT-2 whose head 0 looks only at the previous token and head 1 evenly at every token it may see.

    Token embeddings are zero and position i's embedding is the unit vector e_i, so after the layer norm the
    residual at i is a e_i - b (a, b > 0). Head 0's query map shifts it to c (a e_{i-1} - b) and its key map is the
    identity, so its score for key j is c a^2 [j = i - 1] plus terms that do not depend on j (j < 15): with c
    large the softmax puts all its weight on i - 1. Head 1's query is zero: uniform weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(16, 32))
        w = torch.zeros(32, 96)  # Conv1D: x @ w, columns [query | key | value]
        for m in range(1, 16):
            w[m, m - 1] = 20.0  # head 0 query: dims 0..15, shifted by one position
        w[torch.arange(16), 32 + torch.arange(16)] = 1.0  # head 0 key: identity on dims 0..15
        model.transformer.h[0].attn.c_attn.weight.copy_(w)
        model.transformer.h[0].attn.c_attn.bias.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_previous_token_score_is_one_for_a_head_forced_to_look_back(tmp_path, tokenized):
    from components.evaluate.attention import uniform_score
    from components.lib.models import load_tokenizer

    tok = load_tokenizer(tokenized.path("tokenizer"))
    folder = previous_token_gpt2(tok, tmp_path / "gpt2")
    texts = ["The for statement is used.", "Return the value of x."]
    ctx, out = evaluate(tmp_path, model=str(folder), attention={"texts": texts, "heads": [0, 1], "max_tokens": 10})
    m = out.metrics
    lengths = [1 + len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) <= 15
    assert m["attention/prev_token/l0_h0"] == pytest.approx(1.0, abs=1e-4)
    assert m["attention/prev_token/l0_h1"] == pytest.approx(uniform_score(lengths, causal=True), abs=1e-5)
    assert m["attention/prev_token_uniform"] == pytest.approx(
        sum(1 / (i + 1) for n in lengths for i in range(1, n)) / sum(n - 1 for n in lengths))
    assert m["attention/prev_token_max"] == m["attention/prev_token/l0_h0"] > m["fresh/attention/prev_token_max"]
    heads = [json.loads(r) for r in lines(ctx.out_dir / "attention_heads.jsonl")]
    assert [(h["layer"], h["head"]) for h in heads] == [(0, 0), (0, 1)]
    for name in ("text_0.png", "text_1.png", "prev_token.png"):
        assert (ctx.out_dir / "attention" / name).stat().st_size > 5_000


def test_a_model_without_attention_is_refused_when_validated_and_when_run(tmp_path, tokenized, write_spec):
    import schemas
    from components.lib.models import build_model, load_tokenizer
    from schemas.errors import SpecError
    from schemas.steps.pretrain import ModelSpec

    spec = """
    name: a
    steps:
      tokenizer: {kind: tokenize, corpus: {builtin: pydoc}}
      lstm: {kind: pretrain, tokenizer: tokenizer, model: {family: lstm}}
      tuned: {kind: finetune, model: lstm, data: {builtin: tasks}}
      maps: {kind: evaluate, model: tuned, attention: {}}
    """
    with pytest.raises(SpecError, match=r"steps\.maps\.attention.*model 'tuned' is an lstm .*which has no attention"):
        schemas.load(write_spec(spec))
    tok = load_tokenizer(tokenized.path("tokenizer"))
    folder = tmp_path / "rnn"
    build_model(ModelSpec(family="rnn", layers=1, hidden=16), tok, "causal").save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match="is an rnn language model, which has no attention"):
        evaluate(tmp_path, model=str(folder), attention={})


@pytest.mark.usefixtures("prefect_harness")
def test_the_course_embeddings_and_attention_specs_run_end_to_end(tmp_path, monkeypatch):
    """specs/course/embeddings.yaml then attention.yaml as a user runs them, training cut to 4 steps: the second
    reuses the tokenizer and model the first trained (same steps, same workdir)."""
    from tests.conftest import cut_training, run_shipped_spec, step_result

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cuts = {"embeddings": cut_training(["base"]) + [
        "steps.vectors.max_batches=1", "steps.vectors.embeddings.sentences.n_per_split=20",
        "steps.vectors.embeddings.projector.tokens=200", "steps.vectors.embeddings.dimensions.pairs=100"],
        "attention": cut_training(["base"])}
    for name in ("embeddings", "attention"):
        run_shipped_spec(tmp_path, f"course/{name}.yaml", cuts[name])
    results = {step: step_result(tmp_path, step)["metrics"] for step in ("vectors", "heads", "base")}
    assert 0 <= results["vectors"]["embeddings/probe/accuracy"] <= 1 and "embeddings/analogies/solved" in \
        results["vectors"]
    assert 0 < results["heads"]["attention/prev_token_max"] <= 1
    [projector] = (tmp_path / "runs" / "vectors").glob("*/projector/projector_config.pbtxt")
    assert "tensor_path" in projector.read_text()


def test_the_fresh_twin_is_the_model_pretrain_starts_from_with_the_same_seed(tokenized):
    import lightning as L

    from components.evaluate.attention import fresh_twin
    from components.lib.models import build_model, load_tokenizer
    from schemas.steps.pretrain import ModelSpec

    tok = load_tokenizer(tokenized.path("tokenizer"))
    spec = ModelSpec(family="llama", layers=1, hidden=32, heads=2, context=32)
    L.seed_everything(7, workers=True, verbose=False)  # as components/pretrain.py does before it builds the model
    started = build_model(spec, tok, "causal")
    torch.manual_seed(1)
    trained = build_model(spec, tok, "causal")  # stands in for the trained model: other weights, same config
    twin = fresh_twin(trained, 7, attn_implementation="eager")
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), twin.state_dict().values()))
