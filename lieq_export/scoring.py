"""The LieQ geometry proxy: how much training concentrated each layer's projections.

For projection P of layer l, Z = h·W_Pᵀ on the layer's calibration inputs (after its
input norm for attention projections, after the post-attention norm for the MLP), split
into heads for q/k/v/o. With p_k = σ_k² / Σσ_j², Compact(Z) = exp(−Σ p_k log p_k) is the
effective rank. The same is measured for a seeded random-init baseline Z̃, and

    Δr = (Compact(Z̃) − Compact(Z)) / Compact(Z̃)

is averaged over projections and heads: positive when training packed the energy into
fewer directions than chance would.

Two baselines: "random_proj" applies a random-init W̃ (normal, the model's own init std)
to the trained hidden states; "random_model" runs a randomly initialized copy of the
model on the same tokens and uses its own hidden states and projections.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import atomic_write_text
from .layerwise import IdentityLayer, projection_inputs, walk_layers
from .models import PROJECTIONS, describe, layout_to_dict, model_fingerprint
from .text import text_fingerprint

SCORES_SCHEMA = 1
BASELINES = ("random_proj", "random_model")
QKV = ("q_proj", "k_proj", "v_proj")
ALL_PROJECTIONS = tuple(PROJECTIONS)
HEADED = {"q_proj", "k_proj", "v_proj"}  # outputs split into attention heads


class ScoreError(ValueError):
    pass


@dataclass(frozen=True)
class ScoreConfig:
    projections: tuple[str, ...] = QKV
    baseline: str = "random_proj"
    seed: int = 0
    top_k: int = 8  # for the top-k energy diagnostic
    normalize_rows: bool = False  # mean-centre and L2-normalize each token row of Z first

    def __post_init__(self):
        object.__setattr__(self, "projections", tuple(self.projections))
        bad = [p for p in self.projections if p not in PROJECTIONS]
        if bad or not self.projections:
            raise ScoreError(f"unknown projections {bad}; choose from {list(PROJECTIONS)}")
        if self.baseline not in BASELINES:
            raise ScoreError(f"baseline {self.baseline!r} is unknown; use one of {BASELINES}")
        if self.top_k < 1:
            raise ScoreError("top_k must be at least 1")


def shares(eig: torch.Tensor) -> torch.Tensor:
    """Energy shares p_k = σ_k² / Σσ_j², descending, from σ² (eigenvalues of a Gram matrix)."""
    s2 = eig.flip(0).clamp_min(0)
    return s2 / s2.sum().clamp_min(1e-300)


def spectrum(z: torch.Tensor, normalize_rows: bool = False) -> torch.Tensor:
    """Energy shares of z [tokens, features], float64.

    σ² are the eigenvalues of the float64 Gram matrix on z's smaller side: the same
    numbers as an SVD's, at a fraction of the cost for the wide MLP projections.
    """
    z = z.double()
    if normalize_rows:
        z = z - z.mean(dim=1, keepdim=True)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T
    return shares(torch.linalg.eigvalsh(gram))


def head_spectra(x: torch.Tensor, w: torch.Tensor, proj: str, head_dim: int, normalize_rows: bool,
                 cov: dict) -> list[torch.Tensor]:
    """Energy shares of Z = x·wᵀ for each head (or the whole output for unheaded projections).

    Without row normalization ZᵀZ = W (xᵀx) Wᵀ, and each head's Gram matrix is a diagonal
    block of it: one float64 input covariance per layer serves every projection and the
    random baseline, instead of one product per head.
    """
    w = w.double()
    blocks = w.split(head_dim, dim=0) if proj in HEADED else [w]
    if normalize_rows or x.shape[0] < w.shape[0]:
        z = x.double() @ w.T
        return [spectrum(zh, normalize_rows) for zh in z.split(head_dim, dim=1)] if proj in HEADED else [spectrum(z, normalize_rows)]
    key = id(x)
    if key not in cov:
        xd = x.double()
        cov[key] = xd.T @ xd
    c = cov[key]
    return [shares(torch.linalg.eigvalsh(wb @ c @ wb.T)) for wb in blocks]


def compactness(p: torch.Tensor) -> float:
    """exp(entropy) of the energy shares: the effective rank."""
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def top_k_energy(p: torch.Tensor, k: int) -> float:
    return p[:k].sum().item()


def _seed(seed: int, *parts) -> int:
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_init_like(weight: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(weight.shape, generator=g, dtype=torch.float32) * std


def _layer_stats(layer, inputs, weights_rand, cfg: ScoreConfig, head_dim: int, rand_inputs=None) -> dict:
    """Δr and top-k energy gain of one layer, per projection (averaged over heads)."""
    out = {}
    cov: dict = {}
    for p in cfg.projections:
        w = layer.get_submodule(PROJECTIONS[p]).weight.detach()
        xr = rand_inputs[p] if rand_inputs is not None else inputs[p]
        dr, gain = [], []
        for ph, prh in zip(head_spectra(inputs[p], w, p, head_dim, cfg.normalize_rows, cov),
                           head_spectra(xr, weights_rand[p], p, head_dim, cfg.normalize_rows, cov)):
            c, cr = compactness(ph), compactness(prh)
            dr.append((cr - c) / cr)
            gain.append(top_k_energy(ph, cfg.top_k) - top_k_energy(prh, cfg.top_k))
        out[p] = {"delta_r": sum(dr) / len(dr), "energy_gain": sum(gain) / len(gain), "heads": len(dr)}
    return out


def _random_copy(model, seed: int):
    """A randomly initialized model of the same config (seeded), for the random_model baseline."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = copy.deepcopy(model.config)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _inputs(layer, batches, projections) -> dict[str, torch.Tensor]:
    if set(projections) <= HEADED:  # q/k/v all read the normed residual: no need to run the layer
        x = torch.cat([layer.input_layernorm(h).reshape(-1, h.shape[-1]) for h, _ in batches])
        return {p: x for p in projections}
    return projection_inputs(layer, batches, {p: PROJECTIONS[p] for p in projections})


@torch.inference_mode()
def score_layers(model, windows: torch.Tensor, cfg: ScoreConfig = ScoreConfig(), progress: bool = True) -> dict:
    """LieQ scores of every decoder layer on calibration windows [n, T] (one forward pass)."""
    layout = describe(model)
    std = float(getattr(model.config, "initializer_range", 0.02))
    t0 = time.perf_counter()
    walkers = [walk_layers(model, windows)]
    if cfg.baseline == "random_model":
        walkers.append(walk_layers(_random_copy(model, _seed(cfg.seed, "model")), windows))
    layers = []
    for steps in tqdm(zip(*walkers), total=layout.num_layers, desc="score layers", disable=not progress, leave=False):
        i, layer, batches = steps[0]
        inputs = _inputs(layer, batches, cfg.projections)
        if len(steps) == 1:
            rand_w = {
                p: random_init_like(layer.get_submodule(PROJECTIONS[p]).weight, std, _seed(cfg.seed, i, p))
                for p in cfg.projections
            }
            stats = _layer_stats(layer, inputs, rand_w, cfg, layout.head_dim)
        else:
            _, rlayer, rbatches = steps[1]
            rand_w = {p: rlayer.get_submodule(PROJECTIONS[p]).weight.detach().float() for p in cfg.projections}
            stats = _layer_stats(layer, inputs, rand_w, cfg, layout.head_dim, _inputs(rlayer, rbatches, cfg.projections))
        layers.append({
            "index": i,
            "delta_r": sum(s["delta_r"] for s in stats.values()) / len(stats),
            "energy_gain": sum(s["energy_gain"] for s in stats.values()) / len(stats),
            "projections": stats,
        })
    return {
        "schema_version": SCORES_SCHEMA,
        "scorer": "lieq",
        "config": asdict(cfg),
        "model_fingerprint": model_fingerprint(model),
        "text_fingerprint": text_fingerprint(windows),
        "windows": list(windows.shape),
        "layer_params": [l.params for l in layout.layers],
        "layout": layout_to_dict(layout),
        "scores": [l["delta_r"] for l in layers],
        "layers": layers,
        "seconds": time.perf_counter() - t0,
    }


@torch.inference_mode()
def delta_ppl(model, windows: torch.Tensor, progress: bool = True) -> dict:
    """ΔPPL_l: perplexity with layer l replaced by the identity, minus the full model's (L+1 passes)."""
    from .evaluate import perplexity

    t0 = time.perf_counter()
    base = perplexity(model, windows, progress=False)
    layers = model.model.layers
    out = []
    for i in tqdm(range(len(layers)), desc="ΔPPL probing", disable=not progress, leave=False):
        original = layers[i]
        layers[i] = IdentityLayer()
        try:
            out.append(perplexity(model, windows, progress=False) - base)
        finally:
            layers[i] = original
    return {"base_ppl": base, "scores": out, "seconds": time.perf_counter() - t0,
            "model_fingerprint": model_fingerprint(model), "text_fingerprint": text_fingerprint(windows)}


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    if len(ra) != len(rb) or len(ra) < 2:
        raise ScoreError(f"need two score vectors of equal length >= 2, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):  # average the ranks of ties
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def save_scores(path, scores: dict) -> None:
    atomic_write_text(path, json.dumps(scores, indent=2) + "\n")


def load_scores(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ScoreError(f"scores file {path} does not exist; create it with `lieq-export score`")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ScoreError(f"scores file {path} is not valid JSON: {e}") from e
    if d.get("schema_version") != SCORES_SCHEMA or "scores" not in d or "layer_params" not in d:
        raise ScoreError(f"{path} is not a lieq-export scores file (schema {SCORES_SCHEMA})")
    return d
