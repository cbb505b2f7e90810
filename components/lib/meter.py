"""Count what a step's models compute: the token positions of every forward pass, with and without gradients.

Every model the library builds or loads (components/lib/models.py, components/lib/rewards.py) gets `meter`:
a forward pre-hook on its input embeddings that counts the positions each call computes (padding included,
since it is computed; with a KV cache only the new positions), as training when gradients are enabled and
as inference otherwise. The engine (flows/step.py) resets the counts when a step starts and stores
`measured()` in the step's result, where flows/ledger.py turns them into FLOPs: 6·N·D for training, 2·N·D
for inference (Kaplan et al. 2020), N being the model's parameter count.
"""

from __future__ import annotations

import os
import weakref

import torch

_METERS: list["Meter"] = []


class Meter:
    """The counts of one model: a forward pre-hook on its input embeddings (a deep copy gets its own)."""

    def __init__(self, model: torch.nn.Module | None):
        self.model = weakref.ref(model) if model is not None else None  # no cycle: `del model` still frees it
        self.params = self.trainable = self.train_tokens = self.inference_tokens = 0
        self.trained = False
        _METERS.append(self)

    # Counted eagerly: under torch.compile (trainer.compile, generation.compile) the counts would otherwise be
    # guarded constants, recompiling the graph on every call, or be traced away.
    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        model = self.model() if self.model is not None else None
        if model is None or not args or not isinstance(args[0], torch.Tensor):
            return
        if torch.is_grad_enabled():
            if not self.trained:  # counted once, after peft has frozen or added what it does
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                self.params, self.trained = sum(p.numel() for p in model.parameters()), True
            self.train_tokens += args[0].numel()
        else:
            self.params = self.params or sum(p.numel() for p in model.parameters())
            self.inference_tokens += args[0].numel()

    def __deepcopy__(self, memo: dict) -> "Meter":
        """A copied model (a frozen reference, a critic) is counted as itself, with its own trainable count."""
        model = self.model() if self.model is not None else None
        return Meter(memo.get(id(model), model))

    def __reduce__(self):
        return Meter, (None,)  # a pickled model counts nothing where it is unpickled


def meter(model: torch.nn.Module) -> torch.nn.Module:
    """Count `model`'s forward passes from now on (once, however often it is called); returns the model."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return model
    if isinstance(embeddings, torch.nn.Module) and not any(
            isinstance(h, Meter) for h in embeddings._forward_pre_hooks.values()):
        embeddings.register_forward_pre_hook(Meter(model))
    return model


def reset() -> None:
    """Forget every count (a step starts)."""
    _METERS.clear()


def measured() -> list[dict[str, int]]:
    """Per model that ran: `params` (N), `trainable`, `train_tokens` and `inference_tokens`, for all processes of
    the step (this process's counts times WORLD_SIZE: every rank does its share of the same work)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return [{"params": m.params, "trainable": m.trainable, "train_tokens": m.train_tokens * world,
             "inference_tokens": m.inference_tokens * world}
            for m in _METERS if m.train_tokens or m.inference_tokens]
