"""Compute-optimal sizing (Hoffmann et al. 2022, "Chinchilla"): parameters N and tokens D for a budget.

Pure Python on purpose: `llmcycle plan` prints the chosen N, D and C = 6ND without importing torch.
Two allocators: the rule of thumb D = 20N, and the closed form of the fitted loss (Approach 3)
L(N, D) = E + A/N^alpha + B/D^beta minimised under C = 6ND. N counts non-embedding parameters
(Kaplan et al. 2020), the part of the model the shape controls; at tiny scale the embeddings would
otherwise dominate the count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Approach-3 fit of Hoffmann et al. 2022.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
EXP_N = BETA / (ALPHA + BETA)   # a = 0.452
EXP_D = ALPHA / (ALPHA + BETA)  # b = 0.548
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))  # 1.345
TOKENS_PER_PARAM = 20.0


def chinchilla_loss(n: float, d: float) -> float:
    """The fitted loss L(N, D) = E + A/N^alpha + B/D^beta."""
    return E + A / n ** ALPHA + B / d ** BETA


def allocate(flops: float, rule: str = "tokens_per_param", tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) for a FLOP budget: D = k·N (N = sqrt(C/6k)) or the closed form N = G(C/6)^a, D = (C/6)^b / G."""
    if flops <= 0:
        raise ValueError(f"flops must be positive, got {flops}")
    if rule == "tokens_per_param":
        n = math.sqrt(flops / (6 * tokens_per_param))
        return n, tokens_per_param * n
    if rule == "closed_form":
        return G * (flops / 6) ** EXP_N, (flops / 6) ** EXP_D / G
    raise ValueError(f"unknown sizing rule '{rule}'; expected tokens_per_param or closed_form")


def allocate_for_tokens(tokens: float, rule: str = "tokens_per_param",
                        tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) when the data, not the compute, is fixed: the N for which D tokens is compute-optimal."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if rule == "tokens_per_param":
        return tokens / tokens_per_param, tokens
    if rule == "closed_form":  # invert D = (C/6)^b / G for C/6
        c6 = (tokens * G) ** (1 / EXP_D)
        return G * c6 ** EXP_N, tokens
    raise ValueError(f"unknown sizing rule '{rule}'; expected tokens_per_param or closed_form")


@dataclass
class Shape:
    """A transformer shape and the budget that goes with it."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    params: int          # non-embedding parameters of this shape
    tokens: int          # D
    flops: float         # C = 6ND
    target_params: float  # N before rounding to a shape
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)


def block_params(family: str, layers: int, hidden: int, intermediate: int) -> int:
    """Non-embedding weight count: attention 4d^2, MLP 2·d·ff (3·d·ff for Llama's gated MLP)."""
    mlp = (3 if family == "llama" else 2) * hidden * intermediate
    return layers * (4 * hidden * hidden + mlp)


def intermediate_for(family: str, hidden: int) -> int:
    """MLP width: 4d, or 8d/3 rounded to 16 for Llama so its gated MLP costs the same 8d^2."""
    return 4 * hidden if family != "llama" else max(16, round(8 * hidden / 3 / 16) * 16)


def shape_for(params: float, family: str = "llama", aspect: int = 32, head_dim: int = 32) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, intermediate) with about `params` non-embedding weights and hidden ≈ aspect·layers."""
    layers = max(1, round((params / (12 * aspect * aspect)) ** (1 / 3)))
    hidden = max(16, round(math.sqrt(params / (12 * layers)) / 16) * 16)
    dim = head_dim if hidden % head_dim == 0 else 16
    return layers, hidden, max(1, hidden // dim), intermediate_for(family, hidden)


def size_model(family: str = "llama", flops: float | None = None, tokens: float | None = None,
               rule: str = "tokens_per_param", tokens_per_param: float = TOKENS_PER_PARAM,
               aspect: int = 32) -> Shape:
    """Choose N and D for a FLOP budget (or a token count), round N to a shape, keep C = 6ND exact."""
    if (flops is None) == (tokens is None):
        raise ValueError("give exactly one of flops or tokens")
    n, d = allocate(flops, rule, tokens_per_param) if flops is not None else \
        allocate_for_tokens(tokens, rule, tokens_per_param)
    layers, hidden, heads, inter = shape_for(n, family, aspect)
    params = block_params(family, layers, hidden, inter)
    if flops is not None:  # spend the whole budget on the shape actually built
        d = flops / (6 * params)
    d = int(round(d))
    return Shape(layers=layers, hidden=hidden, heads=heads, intermediate=inter, params=params, tokens=d,
                 flops=6.0 * params * d, target_params=n, rule=rule)
