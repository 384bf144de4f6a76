"""A probe-free scorer: each layer's own quantization damage to the residual stream.

The geometry proxy ranks layers by how trained their projections look; it cannot see
what quantizing a layer does. This scorer measures exactly that, in the same single
walk over the calibration windows: for each decoder layer l and candidate width b, the
layer is run once more with its seven linears rounded to b bits (the plan's grid), and

    damage_l(b) = E‖layer_b(h) − layer(h)‖² / E‖h_final‖²

is the energy of the perturbation it adds to the residual stream, relative to the
stream at the final norm (so layers are compared on one scale). The allocator minimizes
Σ_l damage_l(b_l) under the budget: with independent, additive errors that is the
output error the plan causes. The perturbation passes are run on a subset of the tokens
(`error_tokens`), which keeps the whole score near one forward pass.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .layerwise import first_layer_inputs
from .models import describe, layout_to_dict, model_fingerprint
from .plan import default_group_size
from .quant import WIDTHS, quantize_rtn
from .scoring import SCORES_SCHEMA, ScoreError
from .text import text_fingerprint


@dataclass(frozen=True)
class QErrorConfig:
    widths: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int | None = None  # default: the plan's default group size
    symmetric: bool = False
    error_tokens: int = 1024  # tokens the perturbed layer is run on
    normalize: str = "final"  # "final": by the final residual energy; "local": by the layer's output energy

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(sorted(set(self.widths))))
        bad = [b for b in self.widths if b not in WIDTHS]
        if bad or not self.widths:
            raise ScoreError(f"qerror widths {bad} are not supported; use {WIDTHS}")
        if self.normalize not in ("final", "local"):
            raise ScoreError(f"normalize {self.normalize!r} is unknown; use 'final' or 'local'")


@torch.inference_mode()
def score_qerror(model, windows: torch.Tensor, cfg: QErrorConfig = QErrorConfig(), progress: bool = True,
                 batch_size: int = 4) -> dict:
    layout = describe(model)
    group = cfg.group_size or default_group_size(layout)
    t0 = time.perf_counter()
    batches = [first_layer_inputs(model, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    # The perturbed passes see the first `error_tokens` tokens, in whole windows.
    err_rows = max(1, min(len(windows), -(-cfg.error_tokens // windows.shape[1])))
    _, err_kwargs = first_layer_inputs(model, windows[:err_rows])
    raw, local = [], []
    for i, layer in enumerate(tqdm(model.model.layers, desc="score layers (qerror)", disable=not progress, leave=False)):
        outs = [(layer(h, **kw), kw) for h, kw in batches]
        ref_in = torch.cat([h for h, _ in batches])[:err_rows]
        ref_out = torch.cat([o for o, _ in outs])[:err_rows]
        linears = [layer.get_submodule(s.path.split(f"layers.{i}.")[1]) for s in layout.layers[i].linears]
        saved = [lin.weight.detach().clone() for lin in linears]
        per_width = {}
        for b in cfg.widths:
            for lin, w in zip(linears, saved):
                g = w.shape[1] if b == 8 else group
                lin.weight.copy_(quantize_rtn(w, b, g, cfg.symmetric).dequantize())
            per_width[b] = (layer(ref_in, **err_kwargs) - ref_out).pow(2).sum(-1).mean().item()
        for lin, w in zip(linears, saved):
            lin.weight.copy_(w)
        raw.append(per_width)
        local.append(ref_out.pow(2).sum(-1).mean().item())
        batches = outs
    final = torch.cat([h for h, _ in batches])[:err_rows].pow(2).sum(-1).mean().item()
    if cfg.normalize == "final":
        damage = [{b: e / final for b, e in d.items()} for d in raw]
    else:
        damage = [{b: e / n for b, e in d.items()} for d, n in zip(raw, local)]
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
