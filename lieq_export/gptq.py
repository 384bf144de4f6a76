"""GPTQ (Frantar et al., arXiv 2210.17323) into the same `QuantizedWeight` RTN produces.

Why a compact implementation rather than a library: the maintained GPTQ libraries do
not install here or do not produce our codes. gptqmodel 7.7 requires torch>=2.14.1
(this project pins 2.13) and builds CUDA/C++ extensions; llm-compressor 0.14 pins
transformers<=5.17 (we run 5.25) and pulls compressed-tensors/auto-round. And neither
uses our grid: scales must be bf16-exact and rounded *up* (`bf16_ceil`) with signed
zero points, which is what `grid_params` computes and every exporter relies on. The
algorithm is short, so it lives here, following the reference `GPTQ.fasterquant` of
IST-DASLab/gptq: Hessian H = 2 X Xᵀ, dead columns zeroed, damping `percdamp` x mean
diag, upper Cholesky factor of H⁻¹, block-wise (128 columns) lazy error propagation.

Grids. Group scales/zero points come from `grid_params`, the function RTN uses, so
every scale is bf16-exact and every zero point inside the code range. Without
act-order a group's grid is computed when the loop enters the group, from the weights
as GPTQ has updated them so far (the reference's default). With act-order the columns
are visited by decreasing Hessian diagonal, so grids are *static*: computed for each
group of original columns before the loop (the reference's `static_groups`), and the
result is still a plain group-wise `QuantizedWeight` (a group is contiguous in the
original column order). 8-bit linears use one group per output channel
(`BitPlan.group_size_for`).

Model level (`gptq_quantize_model`): decoder layers in sequence. The inputs of layer 0
for every calibration window are captured with a pre-hook, together with the keyword
arguments of its forward call (rotary position embeddings, attention mask, position
ids), which are reused for every layer. Inside a layer the linears are quantized
sequentially as the reference's `true-sequential` does: q/k/v (one shared input), then
o, then gate/up (shared input), then down; each sees the already-quantized earlier
sublayers, because their dequantized weights are written into a copy of the layer
before the next Hessian is collected. The quantized copy then produces the next
layer's inputs. Memory holds the hidden states of all windows for one layer, one
Hessian at a time, never all layers' activations. The model itself is not modified.

Embedding: round-to-nearest (a lookup table has no input activations, so no Hessian).
lm_head: GPTQ, with the final-norm outputs of the quantized decoder as its inputs; its
Hessian is only hidden x hidden, so it costs seconds even for a 49k vocabulary. A tied
lm_head thus gets codes of its own (the plan stores embedding and lm_head separately).
"""

from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from .models import PROJECTIONS, describe
from .plan import BitPlan
from .quant import QuantizationError, QuantizedWeight, check_group_size, code_range, grid_params, quantize_rtn, round_to_grid

BLOCK_SIZE = 128
# Order in which a decoder layer's linears are quantized; a tuple shares one input.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


def gptq_quantize_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    percdamp: float = 0.01,
    act_order: bool = False,
    blocksize: int = BLOCK_SIZE,
) -> QuantizedWeight:
    """GPTQ of one weight [out, in] given H [in, in] (2 X Xᵀ of its inputs, any positive scale)."""
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    lo, hi = code_range(bits)
    rows, cols = weight.shape
    check_group_size(cols, group_size)
    if tuple(H.shape) != (cols, cols):
        raise QuantizationError(f"Hessian shape {tuple(H.shape)} does not match in_features {cols}")
    n_groups = cols // group_size
    W = weight.detach().float().clone()
    H = H.detach().float().to(W.device).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    dev = W.device
    scales = torch.empty(rows, n_groups, device=dev)
    zeros = None if symmetric else torch.empty(rows, n_groups, device=dev)
    if act_order:
        # static groups: grids from the original columns, before the permuted loop
        for g in range(n_groups):
            s, z = grid_params(W[:, g * group_size : (g + 1) * group_size], bits, symmetric)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=dev)

    Hinv = _inverse_cholesky(H, percdamp)
    col_group = [c // group_size for c in perm.tolist()]
    codes = torch.zeros(rows, cols, device=dev)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if not act_order and col % group_size == 0:
                # the group as GPTQ has updated it so far: in-block part from W1, rest from W
                cur = W1[:, i : i + group_size]
                if cur.shape[1] < group_size:
                    cur = torch.cat([cur, W[:, i2 : col + group_size]], dim=1)
                s, z = grid_params(cur, bits, symmetric)
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s = scales[:, g]
            z = None if zeros is None else zeros[:, g]
            w = W1[:, i]
            q = round_to_grid(w[:, None], s, z, bits)[:, 0]
            deq = (q if z is None else q - z) * s
            Q1[:, i] = q
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        codes[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(
        codes=codes.clamp(lo, hi).to(torch.int8).contiguous(),
        scales=scales.contiguous(),
        zero_points=None if zeros is None else zeros.to(torch.int8).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)⁻¹; damping grows tenfold if H is not positive definite."""
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = percdamp * mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(H.shape[0], device=H.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise QuantizationError("the Hessian stays singular after damping; use more calibration data or a larger percdamp")


class _Hessian:
    """Running H = 2/n Σ X Xᵀ over calibration windows, fed by a forward hook."""

    def __init__(self, cols: int):
        self.cols = cols
        self.H = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.H is None:
            self.H = torch.zeros(self.cols, self.cols, device=x.device)
        # one sample per window, as the reference counts; the scale cancels against damping
        k = 1
        self.H *= self.n / (self.n + k)
        self.n += k
        x = math.sqrt(2 / self.n) * x
        self.H += x.T @ x


def _layer_forward(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _collect_hessian(layer, module: torch.nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
    acc = _Hessian(module.in_features)

    def hook(_mod, args):
        acc.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for h in inputs:
            try:
                _layer_forward(layer, h, kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc.H


def _capture_layer0(model, calib: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    inputs, saved = [], {}

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        inputs.append(h.detach())
        if not saved:
            saved.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in calib:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    for k in ("cache", "past_key_values", "past_key_value"):
        saved.pop(k, None)
    saved["use_cache"] = False
    return inputs, saved


@torch.no_grad()
def gptq_quantize_model(
    model: torch.nn.Module,
    plan: BitPlan,
    calib: torch.Tensor,
    progress: bool = True,
    percdamp: float = 0.01,
    act_order: bool | None = None,
    per_channel_act_order: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ codes for every tensor the plan covers (embedding: RTN), keyed by module path.

    act_order: None follows the plan (`plan.act_order`); it applies to group-wise tensors,
    and to per-channel (8-bit) ones only with `per_channel_act_order`.
    """
    if act_order is None:
        act_order = plan.act_order
    layout = describe(model)
    plan.validate(layout)
    if calib.dim() != 2 or calib.dtype != torch.long or calib.shape[0] == 0:
        raise ValueError(f"calib must be a non-empty LongTensor [n, seq_len], got {calib.dtype} {tuple(calib.shape)}")

    def quantize(w, H, bits):
        g = plan.group_size_for(bits, w.shape[1])
        # Act-order by default only where the grid is group-wise: with one group per row
        # (8-bit) it changes no layout, and on validation text 8-bit GPTQ in natural
        # order had the lower perplexity (benchmarks/results/choices.md).
        ordered = act_order and (g < w.shape[1] or per_channel_act_order)
        return gptq_quantize_weight(w, H, bits, g, plan.symmetric, percdamp=percdamp, act_order=ordered)

    out: dict[str, QuantizedWeight] = {}
    hidden, kwargs = _capture_layer0(model, calib)
    layers = model.model.layers
    for idx in tqdm(range(layout.num_layers), desc="quantize (gptq)", disable=not progress, leave=False):
        bits = plan.layer_bits[idx]
        layer = copy.deepcopy(layers[idx])
        for group in SEQUENTIAL_GROUPS:
            mods = [layer.get_submodule(PROJECTIONS[name]) for name in group]
            H = _collect_hessian(layer, mods[0], hidden, kwargs)
            for name, mod in zip(group, mods):
                qw = quantize(mod.weight, H, bits)
                out[f"model.layers.{idx}.{PROJECTIONS[name]}"] = qw
                mod.weight.copy_(qw.dequantize().to(mod.weight.dtype))
            del H
        hidden = [_layer_forward(layer, h, kwargs).detach() for h in hidden]
        del layer

    if plan.lm_head_bits:
        acc = _Hessian(layout.lm_head.in_features)
        for h in hidden:
            acc.add(model.model.norm(h))
        out[layout.lm_head.path] = quantize(model.lm_head.weight, acc.H, plan.lm_head_bits)
    if plan.embed_bits:
        w = model.model.embed_tokens.weight
        out[layout.embed.path] = quantize_rtn(
            w, plan.embed_bits, plan.group_size_for(plan.embed_bits, layout.embed.in_features), plan.symmetric
        )
    return out
