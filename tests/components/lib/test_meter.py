"""The token meter: positions with gradients count as training, without as inference; copies count on their own."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from components.lib import meter


@pytest.fixture
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    meter.reset()
    yield meter.meter(LlamaForCausalLM(config))
    meter.reset()


def test_training_and_inference_positions_and_parameters(tiny, monkeypatch):
    ids = torch.randint(3, 64, (2, 5))
    tiny.model.embed_tokens.requires_grad_(False)  # as a peft method freezes part of the model
    tiny(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        tiny(input_ids=ids)
    total = sum(p.numel() for p in tiny.parameters())
    frozen = tiny.model.embed_tokens.weight.numel()
    assert meter.measured() == [{"params": total, "trainable": total - frozen, "train_tokens": 10,
                                 "inference_tokens": 10}]

    tiny.generate(input_ids=ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    [counts] = meter.measured()  # the prompt once, then one new position per step with the KV cache
    assert counts["inference_tokens"] == 10 + 4 + 2

    monkeypatch.setenv("WORLD_SIZE", "4")  # every rank does its share: the step's total is 4 times this one's
    assert meter.measured()[0]["train_tokens"] == 40
    meter.meter(tiny)  # a second call adds no second hook
    with torch.no_grad():
        tiny(input_ids=ids)
    monkeypatch.delenv("WORLD_SIZE")
    assert meter.measured()[0]["inference_tokens"] == 26


def test_a_copy_counts_as_a_model_of_its_own_and_pickles(tiny):
    reference = copy.deepcopy(tiny).requires_grad_(False)
    ids = torch.randint(3, 64, (1, 6))
    tiny(input_ids=ids)
    reference(input_ids=ids)  # frozen, but with gradients enabled: counted as a training pass of 0 trainable
    with torch.no_grad():
        reference(input_ids=ids)
    policy, copied = meter.measured()
    assert (policy["train_tokens"], policy["inference_tokens"]) == (6, 0) and policy["trainable"] == policy["params"]
    assert (copied["trainable"], copied["inference_tokens"]) == (0, 6)

    loaded = pickle.loads(pickle.dumps(tiny))  # a model travels without the counts
    loaded(input_ids=ids)
    assert len(meter.measured()) == 2  # the unpickled copy counted nothing
    meter.reset()
    assert meter.measured() == []
