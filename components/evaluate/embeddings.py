"""Token embeddings as vectors: nearest tokens by cosine similarity and a 2-D PCA projection."""

from __future__ import annotations

from pathlib import Path

import torch


def word_vector(embeddings: torch.Tensor, tokenizer, word: str) -> tuple[torch.Tensor, list[int]]:
    """Mean embedding of the word's tokens, preferring the spelling (with or without a leading space) that
    takes fewer tokens (byte-level BPE learns " word" as one token far more often than "word")."""
    spellings = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" " + word, word)]
    ids = min((s for s in spellings if s), key=len)
    return embeddings[ids].mean(0), ids


def nearest_tokens(model, tokenizer, words: list[str], k: int) -> list[dict]:
    """For each word, the k most cosine-similar vocabulary tokens (specials and the word itself excluded)."""
    emb = model.get_input_embeddings().weight.detach().float()
    unit = torch.nn.functional.normalize(emb, dim=-1)
    rows = []
    for word in words:
        vec, ids = word_vector(emb, tokenizer, word)
        sims = unit @ torch.nn.functional.normalize(vec, dim=0)
        sims[list(set(ids) | set(tokenizer.all_special_ids))] = -2.0
        top = sims.topk(k)
        for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            rows.append({"word": word, "rank": rank, "token": tokenizer.decode([idx]), "token_id": idx,
                         "cosine": round(score, 4)})
    return rows


def projection(model, tokenizer, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n non-special token embeddings projected on their top two principal components."""
    emb = model.get_input_embeddings().weight.detach().float()
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(emb.shape[0], len(tokenizer))) if i not in special][:n]
    x = emb[ids] - emb[ids].mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # exact PCA; the matrix is small
    return x @ v[:2].T, [tokenizer.decode([i]) for i in ids]


def plot_projection(points: torch.Tensor, labels: list[str], path: Path, title: str, annotate: int = 80) -> None:
    """Scatter the projected tokens and label a spread-out subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5)
    step = max(1, len(labels) // annotate)
    for i in range(0, len(labels), step):
        ax.annotate(labels[i].replace("\n", "\\n"), (float(points[i, 0]), float(points[i, 1])), fontsize=7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
