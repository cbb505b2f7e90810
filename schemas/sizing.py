"""Compute-optimal sizing (Hoffmann et al. 2022, "Chinchilla"): parameters N and tokens D for a budget.

Pure Python on purpose: `llmcycle plan` prints the chosen N, D and C = 6ND without importing torch.
Two allocators: the rule of thumb D = 20N, and the closed form of the fitted loss (Approach 3)
L(N, D) = E + A/N^alpha + B/D^beta minimised under C = 6ND. N counts non-embedding parameters
(Kaplan et al. 2020), the part of the model the shape controls; at tiny scale the embeddings would
otherwise dominate the count. `Law` holds the constants: the published ones (CHINCHILLA) or those a `scaling`
step fitted (components/lib/scaling_fit.py), with the same conventions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Law:
    """The fitted loss L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal allocation under C = 6ND.

    One implementation for the published constants (`sizing`) and for the ones a `scaling` step fits."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def exp_n(self) -> float:
        """a = beta/(alpha+beta): N_opt grows as C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def exp_d(self) -> float:
        """b = alpha/(alpha+beta): D_opt grows as C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def g(self) -> float:
        """G = (alpha A / (beta B))^(1/(alpha+beta))."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def loss(self, n: float, d: float) -> float:
        """L(N, D) (as A N^-alpha: a fit's large exponent underflows to 0 instead of overflowing)."""
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) under 6ND = C: N = G(C/6)^a, D = (C/6)^b / G."""
        if self.alpha <= 0 or self.beta <= 0 or self.A <= 0 or self.B <= 0:
            raise ValueError(f"the closed form needs A, B, alpha, beta > 0; got A={self.A:.4g}, B={self.B:.4g}, "
                             f"alpha={self.alpha:.4g}, beta={self.beta:.4g} (loss does not fall with N or D)")
        return self.g * (flops / 6) ** self.exp_n, (flops / 6) ** self.exp_d / self.g

    def optimal_for_tokens(self, tokens: float) -> float:
        """The N for which D = `tokens` is compute-optimal (D = (C/6)^b / G inverted for C/6)."""
        self.optimal(6.0)  # the same checks
        return self.g * (tokens * self.g) ** (self.exp_n / self.exp_d)

    def as_dict(self) -> dict:
        return asdict(self)


LAW_KEYS = tuple(f.name for f in fields(Law))


def read_law(path: str | Path) -> Law:
    """The law in a `scaling` step's constants.json (its E, A, B, alpha, beta; other keys describe the fit)."""
    data = json.loads(Path(path).read_text())
    missing = [k for k in LAW_KEYS if not isinstance(data.get(k), (int, float))]
    if missing:
        raise ValueError(f"{path}: no number for {', '.join(missing)}; expected the constants.json a scaling step "
                         "writes")
    return Law(**{k: float(data[k]) for k in LAW_KEYS})


# Approach-3 fit of Hoffmann et al. 2022.
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
E, A, B, ALPHA, BETA = CHINCHILLA.E, CHINCHILLA.A, CHINCHILLA.B, CHINCHILLA.alpha, CHINCHILLA.beta
EXP_N = CHINCHILLA.exp_n  # a = 0.452
EXP_D = CHINCHILLA.exp_d  # b = 0.548
G = CHINCHILLA.g  # 1.345
TOKENS_PER_PARAM = 20.0


def chinchilla_loss(n: float, d: float) -> float:
    """The fitted loss L(N, D) = E + A/N^alpha + B/D^beta with the published constants."""
    return CHINCHILLA.loss(n, d)


def allocate(flops: float, rule: str = "tokens_per_param", tokens_per_param: float = TOKENS_PER_PARAM,
             law: Law = CHINCHILLA) -> tuple[float, float]:
    """(N, D) for a FLOP budget: D = k·N (N = sqrt(C/6k)) or `law`'s closed form N = G(C/6)^a, D = (C/6)^b / G."""
    if flops <= 0:
        raise ValueError(f"flops must be positive, got {flops}")
    if rule == "tokens_per_param":
        n = math.sqrt(flops / (6 * tokens_per_param))
        return n, tokens_per_param * n
    if rule == "closed_form":
        return law.optimal(flops)
    raise ValueError(f"unknown sizing rule '{rule}'; expected tokens_per_param or closed_form")


def allocate_for_tokens(tokens: float, rule: str = "tokens_per_param",
                        tokens_per_param: float = TOKENS_PER_PARAM, law: Law = CHINCHILLA) -> tuple[float, float]:
    """(N, D) when the data, not the compute, is fixed: the N for which D tokens is compute-optimal."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if rule == "tokens_per_param":
        return tokens / tokens_per_param, tokens
    if rule == "closed_form":
        return law.optimal_for_tokens(tokens), tokens
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
               aspect: int = 32, law: Law = CHINCHILLA) -> Shape:
    """Choose N and D for a FLOP budget (or a token count), round N to a shape, keep C = 6ND exact; `law` gives
    the closed form's constants (published ones by default)."""
    if (flops is None) == (tokens is None):
        raise ValueError("give exactly one of flops or tokens")
    n, d = allocate(flops, rule, tokens_per_param, law) if flops is not None else \
        allocate_for_tokens(tokens, rule, tokens_per_param, law)
    layers, hidden, heads, inter = shape_for(n, family, aspect)
    params = block_params(family, layers, hidden, inter)
    if flops is not None:  # spend the whole budget on the shape actually built
        d = flops / (6 * params)
    d = int(round(d))
    return Shape(layers=layers, hidden=hidden, heads=heads, intermediate=inter, params=params, tokens=d,
                 flops=6.0 * params * d, target_params=n, rule=rule)
