"""Bit allocation: one width per decoder layer under an average-bit budget.

Two widths (the paper's mode): the layers with the highest scores get the high width,
taken in score order while the parameter-weighted average stays within the budget.

Three or more widths: an exact knapsack. Each layer l has an importance w_l and a
damage table d_l(b); the allocator minimizes Σ_l d_l(b_l) subject to
Σ_l N_l·b_l ≤ budget·Σ_l N_l (N_l: the layer's linear parameters). From a score vector,
w_l = exp(z_l) with z_l the standardized score and d_l(b) = w_l·4^(−b): group-wise RTN's
mean squared error falls about 4× per extra bit, so this spends bits where the score says
the layer matters most, until that stops paying. A scorer that measures each layer's own
error at each width passes its table directly (`damage=`).

Budgets are caps: the plan's average never exceeds them.
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from .plan import PlanError, check_budget

ALLOCATORS = ("lieq", "random", "reversed", "oracle", "uniform")
TARGET_WIDTHS = {"pte": (4, 8), "onnx": (2, 4, 8), None: (2, 4)}
STORED_WIDTHS = {"pte": (4, 8), "onnx": (2, 4, 8)}  # widths stored without widening
EPS = 1e-9


def damage_from_scores(scores, widths) -> list[dict[int, float]]:
    s = torch.as_tensor(scores, dtype=torch.float64)
    sd = s.std().item() if len(s) > 1 else 0.0
    z = (s - s.mean()) / sd if sd > 0 else torch.zeros_like(s)
    return [{b: math.exp(zl) * 4.0 ** (-b) for b in widths} for zl in z.tolist()]


def _check(layer_params, widths, budget, pins):
    widths = tuple(sorted(set(widths)))
    if len(widths) < 1:
        raise PlanError("give at least one width")
    pins = dict(pins or {})
    for layer, b in pins.items():
        if not 0 <= layer < len(layer_params):
            raise PlanError(f"pinned layer {layer} does not exist; the model has layers 0..{len(layer_params) - 1}")
        if b not in widths:
            raise PlanError(f"layer {layer} is pinned to {b} bits, which is not among the widths {list(widths)}")
    check_budget(widths, budget)
    total = sum(layer_params)
    floor = sum(n * pins.get(i, widths[0]) for i, n in enumerate(layer_params)) / total
    if floor > budget + EPS:
        raise PlanError(f"the pinned layers alone need {floor:.3f} average bits, more than the budget {budget}")
    return widths, pins, total


def allocate_two(scores, layer_params, widths, budget, pins=None) -> tuple[int, ...]:
    """Paper mode: top layers by score at the high width while the average fits the budget."""
    widths, pins, total = _check(layer_params, widths, budget, pins)
    if len(widths) != 2:
        raise PlanError(f"two-width allocation needs exactly two widths, got {list(widths)}")
    lo, hi = widths
    bits = [pins.get(i, lo) for i in range(len(layer_params))]
    used = sum(n * b for n, b in zip(layer_params, bits))
    order = sorted((i for i in range(len(bits)) if i not in pins), key=lambda i: (-scores[i], i))
    for i in order:
        extra = layer_params[i] * (hi - lo)
        if used + extra > budget * total + EPS * total:
            break  # a prefix of the ranking, as in the paper: no skipping to smaller layers
        bits[i] = hi
        used += extra
    return tuple(bits)


def allocate_knapsack(damage, layer_params, widths, budget, pins=None) -> tuple[int, ...]:
    """Exact minimum of Σ damage[l][b_l] with the parameter-weighted average ≤ budget."""
    widths, pins, total = _check(layer_params, widths, budget, pins)
    unit = reduce(math.gcd, layer_params)
    cap = int(math.floor(budget * total / unit + EPS))
    sizes = [n // unit for n in layer_params]
    if cap > 2_000_000:
        raise PlanError("layer sizes share too small a common factor for an exact allocation; use two widths")
    INF = float("inf")
    # best[c]: least damage of the layers so far using exactly c units; choice tracks the widths
    best = {0: 0.0}
    choices = []
    for i, n in enumerate(sizes):
        allowed = [pins[i]] if i in pins else list(widths)
        nxt, pick = {}, {}
        for c, d in best.items():
            for b in allowed:
                c2 = c + n * b
                if c2 > cap:
                    continue
                d2 = d + damage[i][b]
                if d2 < nxt.get(c2, INF) - 1e-15:
                    nxt[c2], pick[c2] = d2, (c, b)
        best = nxt
        choices.append(pick)
    c = min(best, key=lambda k: (best[k], -k))
    bits = []
    for pick in reversed(choices):
        c, b = pick[c]
        bits.append(b)
    return tuple(reversed(bits))


def allocate(scores, layer_params, widths, budget, pins=None, damage=None) -> tuple[int, ...]:
    widths = tuple(sorted(set(widths)))
    if damage is None and len(widths) == 2:
        return allocate_two(scores, layer_params, widths, budget, pins)
    if damage is None:
        damage = damage_from_scores(scores, widths)
    return allocate_knapsack(damage, layer_params, widths, budget, pins)


def baseline_scores(allocator: str, scores=None, oracle=None, n_layers: int | None = None, seed: int = 0):
    """The score vector each allocator ranks by."""
    if allocator not in ALLOCATORS:
        raise PlanError(f"allocator {allocator!r} is unknown; use one of {ALLOCATORS}")
    if allocator == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n_layers if n_layers is not None else len(scores), generator=g, dtype=torch.float64).tolist()
    if allocator == "oracle":
        if oracle is None:
            raise PlanError("the oracle allocator needs ΔPPL scores: run `lieq-export score --delta-ppl`")
        return list(oracle)
    if scores is None:
        raise PlanError(f"allocator {allocator!r} needs scores: run `lieq-export score` first")
    return [-s for s in scores] if allocator == "reversed" else list(scores)


def uniform_bits(n_layers: int, widths, budget) -> tuple[int, ...]:
    matching = [b for b in widths if abs(b - budget) < EPS]
    if not matching:
        raise PlanError(f"a uniform plan needs --avg-bits equal to one width in {sorted(widths)}, got {budget}")
    return (matching[0],) * n_layers


def parse_pins(items) -> dict[int, int]:
    """['0=4', '29=8'] -> {0: 4, 29: 8}."""
    pins = {}
    for item in items or ():
        try:
            layer, bits = item.split("=")
            pins[int(layer)] = int(bits)
        except ValueError:
            raise PlanError(f"pin {item!r} must look like LAYER=BITS, e.g. 0=4") from None
    return pins
