"""A probe-free scorer: each layer's own quantization damage to the residual stream.

The geometry proxy ranks layers by how trained their projections look; it cannot see
what quantizing a layer does. This scorer measures exactly that, in one walk over the
calibration tokens: for each decoder layer l and candidate width b, the layer is run
once more with its seven linears rounded to b bits (the plan's grid), and

    damage_l(b) = E‖γ ⊙ (layer_b(h) − layer(h))‖² / E‖γ ⊙ layer(h)‖²

is the energy of the perturbation it adds to the residual stream as the next reader
sees it: γ is the weight of the RMSNorm through which the next layer (or, after the
last layer, the final norm) reads the stream. The allocator minimizes Σ_l damage_l(b_l)
under the budget.

Why relative, and why through γ. Every later layer reads the stream through an RMSNorm,
so what a perturbation does downstream scales with its size relative to the stream
where it enters ("local"), not with its absolute size ("final": the stream grows with
depth, so absolute errors rank the last layers first). And the stream's energy sits
largely in a few massive-activation channels that the norm weights damp; measured
without γ, the middle layers' damage looks negligible. The choice between "reader",
"local" and "final" was made on validation text (SOTU 1971-1989), not on the evaluation
text: benchmarks/results/choices.md.

Cost: 1 + len(widths) passes of each layer over `error_tokens` tokens, plus rounding
each layer's weights once per width; measuring only the plan's widths keeps it cheap.
With `measure_widest=False` the widest width is not run but extrapolated from the next
one (`damage_table`): one pass fewer, a third less work at two widths. It is not the
default: the damage ratio between adjacent widths varies by layer (3->4 bits: 2.1x to
4.8x on SmolLM2), and on validation text its RTN plan at {3,4} 3.5 landed 6.4 % above
the ΔPPL oracle's (measuring: 2.6 %; benchmarks/results/choices_widest.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .layerwise import first_layer_inputs
from .models import describe, layout_to_dict, model_fingerprint
from .plan import default_group_size, grid_group_size
from .quant import WIDTHS, rtn_dequantized
from .scoring import SCORES_SCHEMA, ScoreError
from .text import text_fingerprint


NORMALIZE = ("reader", "local", "final")


@dataclass(frozen=True)
class QErrorConfig:
    widths: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int | None = None  # default: the plan's default group size
    symmetric: bool = False
    error_tokens: int = 1024  # calibration tokens the layers are run on (whole windows)
    # "reader": through the next norm's weight, relative to the stream; "local": relative
    # to the stream, unweighted; "final": relative to the final stream
    normalize: str = "reader"
    # False: the widest width's damage is extrapolated from the next narrower one
    measure_widest: bool = True

    @property
    def measured_widths(self) -> tuple[int, ...]:
        return self.widths if self.measure_widest or len(self.widths) == 1 else self.widths[:-1]

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(sorted(set(self.widths))))
        bad = [b for b in self.widths if b not in WIDTHS]
        if bad or not self.widths:
            raise ScoreError(f"qerror widths {bad} are not supported; use {WIDTHS}")
        if self.normalize not in NORMALIZE:
            raise ScoreError(f"normalize {self.normalize!r} is unknown; use one of {NORMALIZE}")
        if self.error_tokens < 1:
            raise ScoreError(f"error_tokens must be positive, got {self.error_tokens}")


@torch.inference_mode()
def score_qerror(model, windows: torch.Tensor, cfg: QErrorConfig = QErrorConfig(), progress: bool = True) -> dict:
    layout = describe(model)
    group = cfg.group_size or default_group_size(layout)
    t0 = time.perf_counter()
    rows = max(1, min(len(windows), -(-cfg.error_tokens // windows.shape[1])))
    windows = windows[:rows]
    h, kwargs = first_layer_inputs(model, windows)
    layers = model.model.layers
    raw, local = [], []
    for i, layer in enumerate(tqdm(layers, desc="score layers (qerror)", disable=not progress, leave=False)):
        out = layer(h, **kwargs)
        # the stream as its next reader weighs it (unweighted for "local" and "final")
        gamma = _reader_weight(model, i) if cfg.normalize == "reader" else torch.ones(())
        weights = {(p := s.path.split(f"layers.{i}.")[1]) + ".weight": layer.get_submodule(p).weight
                   for s in layout.layers[i].linears}
        per_width = {}
        for b in cfg.measured_widths:
            # functional_call swaps the rounded weights in for this call only: no copies, and
            # the model is untouched even if the call raises
            rounded = {n: rtn_dequantized(w, b, grid_group_size(b, w.shape[1], group), cfg.symmetric)
                       for n, w in weights.items()}
            out_b = torch.func.functional_call(layer, rounded, (h,), kwargs)
            per_width[b] = ((out_b - out) * gamma).pow(2).sum(-1).mean().item()
        raw.append(per_width)
        local.append((out * gamma).pow(2).sum(-1).mean().item())
        h = out
    final = h.pow(2).sum(-1).mean().item()
    norms = [final] * len(raw) if cfg.normalize == "final" else local
    damage = [{b: e / n for b, e in d.items()} for d, n in zip(raw, norms)]
    lowest = cfg.widths[0]
    return {
        "schema_version": SCORES_SCHEMA,
        "scorer": "qerror",
        "config": {**asdict(cfg), "group_size": group},
        "model_fingerprint": model_fingerprint(model),
        "text_fingerprint": text_fingerprint(windows),
        "windows": list(windows.shape),
        "layer_params": [l.params for l in layout.layers],
        "layout": layout_to_dict(layout),
        # A layer's score is its damage at the lowest width: larger means it needs more bits.
        "scores": [d[lowest] for d in damage],
        "damage": [{str(b): v for b, v in d.items()} for d in damage],
        "seconds": time.perf_counter() - t0,
    }


def _reader_weight(model, i: int) -> torch.Tensor:
    """Weight of the RMSNorm through which the stream after layer i is read next."""
    layers = model.model.layers
    norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm
    return norm.weight.detach().float()


def damage_table(scores: dict, widths) -> list[dict[int, float]]:
    """Per-layer damage at each width; a width that was not measured is extrapolated from
    the nearest measured one at 4x less mean squared error per extra bit."""
    table = []
    for d in scores["damage"]:
        measured = {int(b): v for b, v in d.items()}
        row = {}
        for b in widths:
            near = min(measured, key=lambda m: (abs(m - b), m))
            row[b] = measured[near] * 4.0 ** (near - b)
        table.append(row)
    return table
