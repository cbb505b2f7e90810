"""Attention maps and previous-token heads, for the model and a freshly initialised twin.

- Weights: transformers return them only from their eager attention (`attn_implementation="eager"`,
  `output_attentions=True`): per layer, (heads, query, key), each row a softmax over the keys it may see.
- Previous-token score of a head: the mean weight from token i to token i - 1 over every token i >= 1 of the
  texts (each read after the start token). Previous-token heads are the first half of the induction circuits of
  Olsson et al. 2022, "In-context Learning and Induction Heads". A head that spreads its weight evenly over what
  it may see scores the mean of 1 / (i + 1) (causal) or 1 / n (bidirectional): `uniform_score`.
- Baseline: the same class and config initialised afresh with the step's seed; pretrain seeds the same way
  before it builds a model, so with the pipeline's seed this is the model it started from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from components.lib.meter import meter
from components.lib.sequence_models import SequenceLMConfig

CELL_INCHES = 2.8  # side of one head's heatmap
LABELLED_TOKENS = 32  # token labels on the axes up to this many tokens


def check_has_attention(model, ref: str) -> None:
    """Refuse a model without attention (llmcycle's mlp, rnn and lstm families) before anything runs."""
    if isinstance(model.config, SequenceLMConfig):
        family = model.config.model_type.removeprefix("llmcycle_").removesuffix("_lm")
        raise ValueError(f"attention: model '{ref}' is an {family} language model, which has no attention; attention "
                         "maps need a transformer (llama, gpt2, bert, roberta): remove the attention section or "
                         "evaluate a transformer")


def fresh_twin(model, seed: int, **kw):
    """A freshly initialised model of `model`'s class and config, seeded with `seed` (kw: e.g. attn_implementation)."""
    torch.manual_seed(seed)
    return meter(type(model)._from_config(copy.deepcopy(model.config), **kw)).eval()


@torch.no_grad()
def weights(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the (heads, n, n) attention weights of one sequence (an encoder-decoder's encoder)."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    found = encoder(input_ids=x, output_attentions=True).attentions
    if not found:
        raise ValueError(f"attention: the {model.config.model_type} model returned no attention weights; it must be "
                         "loaded with attn_implementation='eager'")
    return [a[0].float().cpu() for a in found]


def previous_token_scores(maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """(layers, heads) mean weight from token i to token i - 1 over every i >= 1 of every sequence."""
    total, count = 0.0, 0
    for layers in maps:
        n = layers[0].shape[-1]
        if n > 1:
            total = total + torch.stack(layers).diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1)  # A[i, i - 1]
            count += n - 1
    if not count:
        raise ValueError("attention.texts: every text is a single token; the score needs two or more")
    return total / count


def uniform_score(lengths: list[int], causal: bool) -> float:
    """The previous-token score of a head attending evenly to every token it may see."""
    weights_ = [1 / (i + 1) if causal else 1 / n for n in lengths for i in range(1, n)]
    return sum(weights_) / max(1, len(weights_))


def pick(chosen: list[int] | None, available: int, field: str, what: str) -> list[int]:
    """The chosen layer or head indices (all when None); one out of range raises naming the field."""
    if chosen is None:
        return list(range(available))
    wrong = [i for i in chosen if i >= available]
    if wrong:
        raise ValueError(f"{field}: {', '.join(map(str, wrong))} out of range; the model has {available} {what} "
                         f"(0..{available - 1})")
    return list(dict.fromkeys(chosen))


def head_rows(trained: torch.Tensor, fresh: torch.Tensor) -> list[dict]:
    return [{"layer": layer, "head": head, "prev_token": round(float(trained[layer, head]), 4),
             "fresh_prev_token": round(float(fresh[layer, head]), 4)}
            for layer in range(trained.shape[0]) for head in range(trained.shape[1])]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_maps(maps: list[torch.Tensor], tokens: list[str], layers: list[int], heads: list[int],
              scores: torch.Tensor, path: Path, title: str) -> None:
    """One text's heatmaps: a row per layer, a column per head; row i of a map is where token i looks. `scores`:
    the text's own previous-token score per head, shown in each title."""
    plt = _plt()
    n = len(tokens)
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False, layout="constrained",
                             figsize=(CELL_INCHES * len(heads) + 1.2, CELL_INCHES * len(layers) + 1.2))
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[layer][head][:n, :n].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"layer {layer} head {head}: prev {float(scores[layer, head]):.2f}", fontsize=8)
            labelled = n <= LABELLED_TOKENS
            ax.set_xticks(range(n) if labelled and r == len(layers) - 1 else [])
            ax.set_yticks(range(n) if labelled and c == 0 else [])
            if labelled and r == len(layers) - 1:
                ax.set_xticklabels(tokens, rotation=90, fontsize=6)
            if labelled and c == 0:
                ax.set_yticklabels(tokens, fontsize=6)
    fig.suptitle(f"{title}\nrow: the token attending; column: the token it attends to")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(trained: torch.Tensor, fresh: torch.Tensor, uniform: float, path: Path, title: str) -> None:
    """Previous-token score per head, trained beside fresh, as two layer x head grids."""
    plt = _plt()
    layers, heads = trained.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.7 * heads + 1.8), 0.6 * layers + 1.8), squeeze=False)
    for ax, grid, name in ((axes[0][0], trained, "trained"), (axes[0][1], fresh, "freshly initialised")):
        ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for layer in range(layers):
            for head in range(heads):
                value = float(grid[layer, head])
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
        ax.set(xticks=range(heads), yticks=range(layers), xlabel="head", ylabel="layer", title=name)
    fig.suptitle(f"{title}\nprevious-token score (uniform attention: {uniform:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
