"""Why token vectors can be added with little loss: the high-dimension argument of the course's embedding slides.

- Near-orthogonality: for two independent Gaussian vectors in d dimensions, cos has density proportional to
  (1 - t^2)^((d - 3) / 2) on [-1, 1], so E|cos| = Gamma(d / 2) / (sqrt(pi) Gamma((d + 1) / 2)), which tends to
  sqrt(2 / (pi d)): random directions are nearly orthogonal, ever more so as d grows (~ 1 / sqrt(d)).
- Superposition: add `summed` vectors drawn from a dictionary of random ones; the dot products of the sum with the
  dictionary pick the summed ones out again (the top `summed` scores) more and more surely as d grows.
- Corners: the hypercube {-1, 1}^d, whose corners are directions as far apart as these, has 2^d of them.
The model's own token embeddings are measured beside the random ones (a trained embedding is seldom isotropic).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TRIALS = 200  # sums drawn per dimension in the superposition panel
CHUNK = 1 << 22  # values per random draw at most (memory stays a few tens of MB at any dimension)
SLIDE_CORNERS = (1, 2, 3, 10)  # the dimensions the slide counts corners for: 2, 4, 8, 1024
MAX_CORNERS_DIM = 256  # 2^256 ~ 1e77: a log axis much taller than that overflows matplotlib's tick locator


def expected_abs_cos(d: int) -> float:
    """E|cos| of two independent Gaussian vectors in d dimensions (exact; ~ sqrt(2 / (pi d)) for large d)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def random_abs_cos(d: int, pairs: int, generator: torch.Generator) -> float:
    """Mean |cos| of `pairs` pairs of independent standard Gaussian vectors in d dimensions."""
    total, done = 0.0, 0
    step = max(1, CHUNK // (2 * d))
    while done < pairs:
        n = min(step, pairs - done)
        x, y = torch.randn(2, n, d, generator=generator, dtype=torch.float64)
        total += torch.nn.functional.cosine_similarity(x, y, dim=-1).abs().sum().item()
        done += n
    return total / pairs


def sum_recovery(d: int, summed: int, dictionary: int, generator: torch.Generator, trials: int = TRIALS) -> float:
    """Share of the summed vectors that are among the `summed` dictionary vectors with the largest dot product
    with their sum (random Gaussian dictionary, `trials` sums of distinct entries)."""
    words = torch.randn(dictionary, d, generator=generator)
    picked = torch.rand(trials, dictionary, generator=generator).argsort(dim=1)[:, :summed]
    scores = words[picked].sum(1) @ words.T
    found = scores.topk(summed, dim=1).indices
    return (found[:, :, None] == picked[:, None, :]).any(-1).float().mean().item()


def token_abs_cos(embeddings: torch.Tensor, pairs: int, generator: torch.Generator) -> float:
    """Mean |cos| over random pairs of distinct rows of an embedding matrix."""
    n = embeddings.shape[0]
    i = torch.randint(0, n, (pairs,), generator=generator)
    j = (i + torch.randint(1, n, (pairs,), generator=generator)) % n  # never the same row
    return torch.nn.functional.cosine_similarity(embeddings[i], embeddings[j], dim=-1).abs().mean().item()


def measure(dims: list[int], pairs: int, summed: int, dictionary: int, seed: int) -> dict[str, list[float]]:
    """Per dimension: the measured and exact mean |cos|, and the superposition recovery."""
    generator = torch.Generator().manual_seed(seed)
    dims = sorted(set(dims))
    return {"dims": dims, "abs_cos": [random_abs_cos(d, pairs, generator) for d in dims],
            "expected": [expected_abs_cos(d) for d in dims],
            "recovery": [sum_recovery(d, summed, dictionary, generator) for d in dims]}


def plot(path: Path, curves: dict, model_dim: int, model_abs_cos: float, summed: int, dictionary: int,
         title: str) -> None:
    """Three panels: mean |cos| against d (log-log), the superposition recovery, the 2^d corners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = curves["dims"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    smooth = sorted(set(dims) | {model_dim})
    left.loglog(dims, curves["abs_cos"], "o", label="measured, random Gaussian pairs")
    left.loglog(smooth, [expected_abs_cos(d) for d in smooth], "-", label="exact E|cos|")
    left.loglog(smooth, [math.sqrt(2 / (math.pi * d)) for d in smooth], "--", label="sqrt(2 / (pi d))")
    left.loglog([model_dim], [model_abs_cos], "*", markersize=14, label=f"this model's tokens (d = {model_dim})")
    left.set(xlabel="dimension d", ylabel="mean |cos| of two vectors", title="Random vectors are nearly orthogonal")
    left.legend(fontsize=8)
    middle.semilogx(dims, curves["recovery"], "o-")
    middle.axvline(model_dim, color="grey", linestyle=":", label=f"this model: d = {model_dim}")
    middle.set(xlabel="dimension d", ylabel="share of the summed vectors found again", ylim=(0, 1.05),
               title=f"Sum of {summed} of {dictionary} random vectors")
    middle.legend(fontsize=8)
    corners = list(range(1, min(max(dims + [model_dim, 16]), MAX_CORNERS_DIM) + 1))
    right.loglog(corners, [2.0 ** d for d in corners], "-")
    marked = SLIDE_CORNERS + ((model_dim,) if model_dim <= MAX_CORNERS_DIM else ())
    right.loglog(marked, [2.0 ** d for d in marked], "o", color="C3")
    right.text(0.04, 0.96, "\n".join(f"d = {d}: {2 ** d:,}" if d <= 16 else f"d = {d}: {2.0 ** d:.3g}"
                                     for d in marked), transform=right.transAxes, va="top", fontsize=8)
    right.set(xlabel="dimension d", ylabel="corners of the hypercube {-1, 1}^d", title="2^d corners")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
