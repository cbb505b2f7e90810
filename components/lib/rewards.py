"""Rewards: verifiable reward functions registered by name, and the scores of a trained reward model.

Verifiable rewards are Python functions registered by name, for `ppo.reward: {function: NAME}`.

A reward function takes `(prompt, completion, row)` and returns a float; `row` is the prompt's data
row (builtin task rows carry `answer`, JSONL rows whatever the file holds). Register your own with
`@reward("name")` in a module that `ppo.reward.module` imports, or name one `module:function` (grpo's
`rewards:`), which loads `module.py` from the spec's folder (`load_reward`).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Callable

import torch

from components.lib.phases import charged

RewardFn = Callable[[str, str, dict], float]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str, module: str | None = None) -> RewardFn:
    """The function registered as `name`, importing `module` first so it can register its own."""
    if module:
        importlib.import_module(module)
    if name not in REWARDS:
        from schemas.errors import did_you_mean

        raise KeyError(f"reward.function: no reward function named {name!r}{did_you_mean(name, REWARDS)}; "
                       f"registered: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def load_reward(ref: str, folder: Path | None = None, field: str = "rewards") -> RewardFn:
    """A reward function: a registered name (`exact_match`), or `module:function` from `module.py` in `folder` (the
    spec's folder; else an importable module). The second form imports and runs the user's own code, as TRL's
    `reward_funcs` do; the function takes `(prompt, completion, row)` and returns a float (or None: not scored)."""
    if ":" not in ref:
        return get_reward(ref)
    module_name, _, name = ref.partition(":")
    module = _import_user_module(module_name, folder, field)
    fn = getattr(module, name, None)
    if not callable(fn):
        from schemas.errors import did_you_mean

        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise ValueError(f"{field}: {module.__file__} has no function {name!r}{did_you_mean(name, found)}; "
                         f"it defines: {', '.join(sorted(found)) or 'no functions'}")
    return fn


def _import_user_module(name: str, folder: Path | None, field: str):
    """`folder/name.py` (dots are folders) loaded as a module, else `import name`."""
    import importlib.util
    import sys

    path = Path(folder or ".") / (name.replace(".", "/") + ".py")
    if path.is_file():
        key = f"llmcycle_user_rewards.{name}"
        if key not in sys.modules:
            loaded = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(loaded)
            sys.modules[key] = module
            try:
                loaded.loader.exec_module(module)
            except BaseException:
                del sys.modules[key]
                raise
        return sys.modules[key]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{field}: no file {path} beside the spec and no importable module {name!r} "
                         f"({err}); write {name.replace('.', '/')}.py next to the spec") from None


@reward("exact_match")
def exact_match(prompt: str, completion: str, row: dict) -> float:
    """1 when the completion's first line equals the row's `answer` (the task mixture's check), else 0."""
    from components.lib.evaluation import exact_match

    if "answer" not in row:
        raise KeyError("reward 'exact_match' needs an 'answer' field in each prompt row")
    return float(exact_match(completion, row["answer"]))


@reward("contains_answer")
def contains_answer(prompt: str, completion: str, row: dict) -> float:
    """1 when the row's `answer` appears anywhere in the completion, else 0."""
    if "answer" not in row:
        raise KeyError("reward 'contains_answer' needs an 'answer' field in each prompt row")
    return float(str(row["answer"]).strip() in completion)


@reward("length_penalty")
def length_penalty(prompt: str, completion: str, row: dict) -> float:
    """−(characters / 100): a reward for brevity, to mix with others or to demonstrate reward hacking."""
    return -len(completion) / 100


# -- reward models ---------------------------------------------------------------------------------
# A reward model is `AutoModelForSequenceClassification` with one output, read at the last attended token
# (the EOS that ends the reply). `reward_model` trains one; `ppo` scores rollouts with it and, as a critic,
# reads its head at every position.

STATS_FILE = "reward_stats.json"


def pooled_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, for left or right padding."""
    width = attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """The score head applied at every position: (batch, length). Used as reward and as critic values.
    A packed batch (components/lib/packing.py) gives `positions` and no attention mask."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      position_ids=position_ids(attention_mask) if positions is None else positions).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One reward per sequence, read at its last attended token."""
    scores = token_scores(model, input_ids, attention_mask)
    return scores.gather(1, pooled_index(attention_mask)[:, None]).squeeze(1)


def batch_rewards(model, batch: dict) -> torch.Tensor:
    """One reward per sequence of a padded batch (`sequence_rewards`) or a packed one (read at each sequence's
    last token)."""
    if "sequence_index" not in batch:
        return sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    from components.lib.packing import at_last_tokens

    return at_last_tokens(token_scores(model, batch["input_ids"], None, batch["position_ids"]), batch["last_index"])


@charged("startup")  # the ledger's split of the step's time (components/lib/phases.py)
def load_reward_model(source: str, seed: int = 0):
    """(model, tokenizer): a one-output classification head on `source`, with a pad distinct from EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl.trainer.utils import disable_dropout_in_model

    from components.lib.meter import meter
    from components.lib.models import check_trusted

    check_trusted(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score weights newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad == EOS the final EOS would count as padding and the reward would be read too early.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if not (Path(source) / STATS_FILE).is_file():  # a fresh head: N(0, 1/√(d+1)) as in Huang et al. 2024
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = model.score.weight
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1] + 1))
    disable_dropout_in_model(model)
    return meter(model), tokenizer  # after the resize, which replaces the embeddings


def read_reward_stats(folder: str | Path) -> dict:
    """The statistics a reward_model step saved beside its weights ({} for foreign folders)."""
    path = Path(folder) / STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@charged("startup")
def load_frozen_reward_model(source: str, tokenizer, stats: dict | None = None, normalize: bool = True):
    """(model, mean, scale) to score a policy's rollouts: the frozen reward model, the reference mean to subtract
    and the held-out reward std to divide by (1 unless `normalize`), from `stats` (the reward_model step's info)
    or the statistics saved beside the weights; the score used is (r - mean) / scale."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.utils import disable_dropout_in_model

    from components.lib.meter import meter
    from components.lib.models import check_trusted

    check_trusted(source)
    rm = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True).requires_grad_(False).eval()
    disable_dropout_in_model(meter(rm))
    if rm.config.vocab_size < len(tokenizer):
        raise ValueError(f"reward_model: its vocabulary ({rm.config.vocab_size}) is smaller than the policy's "
                         f"({len(tokenizer)}); train the reward model from the policy (reward_model.model)")
    saved = stats or read_reward_stats(source)
    mean = float(saved.get("reference_mean", 0.0))
    scale = max(float(saved.get("reward_std", 1.0)), 1e-6) if normalize else 1.0
    return rm, mean, scale


def reward_model_source(ref: str, ctx) -> str:
    """The folder of a reward model reference: a reward_model step's output, or an external model."""
    from schemas.base import is_external

    if not is_external(ref):
        return str(ctx.step(ref).path("reward_model"))
    return ctx.model_source(ref)
