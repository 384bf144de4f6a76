"""ExecuTorch `.pte` export: a quantized model + its bit plan -> an XNNPACK bundle.

The model is rebuilt as ExecuTorch's own Llama `Transformer`
(`executorch.examples.models.llama`), the one its `export_llm` tool and the C++
`TextLLMRunner` are written for: custom SDPA op with an in-place static KV cache,
dynamic prefill length, and the constant metadata methods the runner reads.

Weights are never re-chosen by torchao: every linear gets a torchao
`IntxUnpackedToInt8Tensor` built from *our* codes and scales, with int8 dynamic
per-token activation quantization (torchao's 8da4w / 8da8w format), which the
XNNPACK partitioner lowers to its qd8-f32-qc4w / qb4w / qc8w GEMMs:

  * 4-bit  -> int4, per group (group a multiple of 32) or per output channel
  * 8-bit  -> int8, per output channel
  * 2/3-bit -> the same function written as symmetric int4 codes (codes - zero point
    lies in [-3, 3] / [-7, 7]); they take 4 bits on disk (XNNPACK has no 2/3-bit GEMM).

Embeddings use ExecuTorch's quantized embedding kernels
(`quantized_decomposed::embedding_4bit` / `embedding_byte`), lm_head is a linear
like the others. A tied lm_head is stored twice (as embedding table and as linear).

Bundle layout: model.pte, tokenizer.json, plan.json, manifest.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

PTE_FILE = "model.pte"
TOKENIZER_FILE = "tokenizer.json"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_SEQ_LEN = 512
XNNPACK_GROUP_MULTIPLE = 32


class PteExportError(ValueError):
    pass


# --------------------------------------------------------------------------------------
# Runtime prerequisites
# --------------------------------------------------------------------------------------


def load_runtime_ops() -> None:
    """Register the custom SDPA / KV-cache ops and the quantized kernels (AOT and runtime)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


# --------------------------------------------------------------------------------------
# Hugging Face config / weights -> ExecuTorch Llama Transformer
# --------------------------------------------------------------------------------------

# HF module path pattern -> ET module path pattern (same for Llama and Qwen3).
_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm_fn",
    "self_attn.k_norm": "attention.k_norm_fn",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    # ET's FeedForward is w2(silu(w1(x)) * w3(x)).
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def et_module_path(hf_path: str) -> str:
    if hf_path == "model.embed_tokens":
        return "tok_embeddings"
    if hf_path == "model.norm":
        return "norm"
    if hf_path == "lm_head":
        return "output"
    parts = hf_path.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _LAYER_MAP:
            return f"layers.{parts[2]}.{_LAYER_MAP[rest]}"
    raise PteExportError(f"no ExecuTorch counterpart for module {hf_path!r}")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise PteExportError(f"RoPE type {rope_type!r} is not supported by the .pte exporter (only default RoPE)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise PteExportError("config has no rope_theta")
    return float(theta)


def model_args_for(cfg, *, max_seq_len: int, max_context_len: int | None = None, use_kv_cache: bool = True):
    """ExecuTorch `ModelArgs` equivalent to a HF Llama / Qwen3 config."""
    from executorch.examples.models.llama.model_args import ModelArgs

    arch = (getattr(cfg, "architectures", None) or [""])[0] or cfg.model_type
    model_type = cfg.model_type
    if model_type not in ("llama", "qwen3"):
        raise PteExportError(f"model type {model_type!r} ({arch}) is not supported by the .pte exporter")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise PteExportError(f"activation {cfg.hidden_act!r} is not supported (silu only)")
    if getattr(cfg, "mlp_bias", False):
        raise PteExportError("MLP biases are not supported by the .pte exporter")
    max_context_len = max_context_len or max_seq_len
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelArgs(
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size,
        hidden_dim=cfg.intermediate_size,
        head_dim=head_dim,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=_rope_theta(cfg),
        # HF checkpoints keep q/k rows in HF's rotate-half layout; ET's HF RoPE uses it
        # directly (no Meta interleave permutation needed).
        use_hf_rope=True,
        use_qk_norm=model_type == "qwen3",
        qk_norm_before_rope=True,
        attention_qkv_bias=bool(getattr(cfg, "attention_bias", False)),
        max_batch_size=1,
        max_seq_len=max_seq_len,
        max_context_len=max_context_len,
        use_kv_cache=use_kv_cache,
        use_sdpa_with_kv_cache_op=use_kv_cache,
        enable_dynamic_shape=True,
        generate_full_logits=False,
    )


def _hf_float_state_dict(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in hf_model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if "rotary_emb" in mod:
            continue
        sd[f"{et_module_path(mod)}.{leaf}"] = t.detach().to(torch.float32)
    if "output.weight" not in sd:  # tied and not listed
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


# --------------------------------------------------------------------------------------
# Storage of one quantized weight
# --------------------------------------------------------------------------------------


@dataclass
class Storage:
    """How one weight is stored in the .pte."""

    name: str  # HF module path
    kind: str  # 'linear' | 'embedding' | 'float'
    grid_bits: int | None  # bits of the plan's grid (None: float)
    storage_bits: int  # bits per weight on disk (32 for float)
    group_size: int | None  # None: float; == in_features: per channel
    in_features: int
    out_features: int
    scale_bytes: int  # bytes per stored scale
    note: str | None = None

    @property
    def n_groups(self) -> int:
        return 0 if not self.group_size else self.out_features * (self.in_features // self.group_size)

    @property
    def predicted_bytes(self) -> int:
        n = self.in_features * self.out_features
        data = math.ceil(n * self.storage_bits / 8)
        zp = self.n_groups * self.scale_bytes if (self.kind == "embedding" and self.note == "asymmetric") else 0
        return data + self.n_groups * self.scale_bytes + zp

    def as_dict(self) -> dict:
        d = {
            "module": self.name,
            "kind": self.kind,
            "grid_bits": self.grid_bits,
            "storage_bits": self.storage_bits,
            "group_size": self.group_size,
            "shape": [self.out_features, self.in_features],
            "predicted_bytes": self.predicted_bytes,
        }
        if self.note:
            d["note"] = self.note
        return d


def _symmetric_requant(w: torch.Tensor, bits: int, group_size: int):
    """Symmetric RTN of a float weight (fallback grid when ours cannot be stored)."""
    hi = (1 << (bits - 1)) - 1
    lo = -(1 << (bits - 1))
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    scale = (g.abs().amax(dim=-1) / hi).clamp_min(1e-12)
    # bf16-representable, rounded up, like lieq_export.quant
    bits32 = scale.contiguous().view(torch.int32)
    scale = torch.where((bits32 & 0xFFFF) != 0, (bits32 | 0xFFFF) + 1, bits32).view(torch.float32)
    codes = torch.round(g / scale[..., None]).clamp(lo, hi).to(torch.int8).reshape(out_f, in_f)
    return codes, scale


def linear_storage_plan(name: str, qw, fallback_warnings: list[str]) -> tuple[Storage, torch.Tensor, torch.Tensor, torch.dtype]:
    """(storage record, int8 codes [out,in], float32 scales [out, n_groups], torchao target dtype).

    The codes/scales returned compute exactly `qw.dequantize()` unless a fallback
    (recorded in `fallback_warnings`) was necessary.
    """
    out_f, in_f = qw.codes.shape
    bits, gs = qw.bits, qw.group_size
    note = None
    if bits in (4, 8) and qw.zero_points is not None:
        raise PteExportError(
            f"{name}: {bits}-bit weights with zero points cannot be stored by XNNPACK "
            f"(it needs symmetric 4/8-bit grids); re-plan with --symmetric"
        )
    if bits not in (2, 3, 4, 8):
        raise PteExportError(f"{name}: {bits}-bit weights are not supported")
    # codes - zp: for 2/3-bit asymmetric grids this lies inside int4 -> same function.
    codes = qw.centered_codes() if qw.zero_points is not None else qw.codes.to(torch.int16)
    scales = qw.scales.to(torch.float32)
    if bits == 8:
        target, storage_bits = torch.int8, 8
        if gs != in_f:
            msg = (f"{name}: 8-bit group size {gs} is not per-channel; XNNPACK stores 8-bit weights "
                   f"per output channel only -> re-quantized per channel (function changes slightly)")
            fallback_warnings.append(msg)
            c, s = _symmetric_requant(qw.dequantize(), 8, in_f)
            codes, scales, gs, note = c.to(torch.int16), s, in_f, "per-channel fallback"
    else:
        target, storage_bits = torch.int4, 4
        if bits < 4:
            note = f"{bits}-bit grid in int4 container"
        if gs != in_f and gs % XNNPACK_GROUP_MULTIPLE != 0:
            msg = (f"{name}: group size {gs} is not a multiple of {XNNPACK_GROUP_MULTIPLE}; XNNPACK "
                   f"cannot store it -> re-quantized per output channel at 4 bits (function changes)")
            fallback_warnings.append(msg)
            c, s = _symmetric_requant(qw.dequantize(), 4, in_f)
            codes, scales, gs, note = c.to(torch.int16), s, in_f, "per-channel fallback"
    lo, hi = (-8, 7) if target == torch.int4 else (-128, 127)
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise PteExportError(f"{name}: codes do not fit the {storage_bits}-bit container")
    scale_bytes = 2 if gs != in_f else 4  # XNNPACK keeps blockwise scales as bf16
    st = Storage(name, "linear", bits if note != "per-channel fallback" else storage_bits, storage_bits,
                 gs, in_f, out_f, scale_bytes, note)
    return st, codes.to(torch.int8), scales.reshape(out_f, in_f // gs).contiguous(), target


def make_intx_weight(codes: torch.Tensor, scales: torch.Tensor, target: torch.dtype):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    out_f, in_f = codes.shape
    gs = in_f // scales.shape[1]
    return IntxUnpackedToInt8Tensor(
        qdata=codes.contiguous(),
        scale=scales.to(torch.float32),
        zero_point=torch.zeros_like(scales, dtype=torch.int8),
        target_dtype=target,
        block_size=(1, gs),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )


class QuantEmbedding(nn.Module):
    """Embedding through ExecuTorch's quantized embedding kernels, from our codes."""

    def __init__(self, qw):
        super().__init__()
        vocab, dim = qw.codes.shape
        self.bits = qw.bits
        if qw.bits == 8:
            self.register_buffer("weight", qw.codes.contiguous())
        elif qw.bits == 4:
            u = (qw.codes.to(torch.int16) + 8).to(torch.uint8).view(vocab, dim // 2, 2)
            self.register_buffer("weight", (u[:, :, 0] * 16 + u[:, :, 1]).contiguous())
        else:
            raise PteExportError(f"embedding bits must be 4 or 8, got {qw.bits}")
        # float32 scales and zero points: the kernels require zero points in the output
        # dtype, and dequantizing with fp16 scales rounds (q - zp) * scale in fp16.
        self.scale_bytes = 4
        scales = qw.scales.to(torch.float32)
        zps = None if qw.zero_points is None else qw.zero_points.to(torch.float32)
        if scales.shape[1] == 1:
            scales = scales[:, 0]
            zps = None if zps is None else zps[:, 0]
        self.register_buffer("scales", scales.contiguous())
        if zps is not None:
            self.register_buffer("zero_points", zps.contiguous())
        else:
            self.zero_points = None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return torch.ops.quantized_decomposed.embedding_byte.dtype(
                self.weight, self.scales, self.zero_points, -128, 127, indices, dtype=torch.float32
            )
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.weight, self.scales, self.zero_points, -8, 7, indices, dtype=torch.float32
        )

    def _apply(self, fn, recurse=True):  # keep scale dtype through model.to(float32)
        return self


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


# --------------------------------------------------------------------------------------
# Build the ExecuTorch eager model
# --------------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    model: nn.Module
    storages: list[Storage]
    warnings: list[str] = field(default_factory=list)
    tied: bool = False
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_context_len: int = DEFAULT_MAX_SEQ_LEN
    n_layers: int = 0
    vocab_size: int = 0


def _is_tied(hf_model) -> bool:
    try:
        return hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    except AttributeError:
        return bool(getattr(hf_model.config, "tie_word_embeddings", False))


def build_et_model(hf_model: nn.Module, qweights: Mapping[str, Any], *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                   max_context_len: int | None = None, use_kv_cache: bool = True, tied: bool | None = None) -> BuiltModel:
    """ExecuTorch Llama Transformer computing `hf_model` with `qweights` in place of its weights."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer

    load_runtime_ops()
    cfg = hf_model.config
    args = model_args_for(cfg, max_seq_len=max_seq_len, max_context_len=max_context_len, use_kv_cache=use_kv_cache)
    with torch.device("meta"):
        model = construct_transformer(args)
    sd = _hf_float_state_dict(hf_model)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if m.endswith(".weight") or m.endswith(".bias")]
    if missing or unexpected:
        raise PteExportError(f"weight mapping failed: missing={missing} unexpected={unexpected}")
    # Buffers not in the checkpoint (KV caches, ...) were created on meta: materialize them.
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype)
    model.eval()

    storages: list[Storage] = []
    notes: list[str] = []
    tied = _is_tied(hf_model) if tied is None else tied
    hidden = cfg.hidden_size
    vocab = cfg.vocab_size
    for hf_path, qw in qweights.items():
        if hf_path == "model.embed_tokens":
            continue
        et_path = et_module_path(hf_path)
        lin = model.get_submodule(et_path)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(qw.codes.shape):
            raise PteExportError(f"{hf_path}: shape {tuple(qw.codes.shape)} does not match the model")
        st, codes, scales, target = linear_storage_plan(hf_path, qw, notes)
        lin.weight = nn.Parameter(make_intx_weight(codes, scales, target), requires_grad=False)
        storages.append(st)
    # float linears left in place
    quantized = set(qweights)
    for name, mod in hf_model.named_modules():
        if isinstance(mod, nn.Linear) and name not in quantized:
            storages.append(Storage(name, "float", None, 32, None, mod.in_features, mod.out_features, 0,
                                    "tied copy of embedding" if (name == "lm_head" and tied) else None))
    emb_qw = qweights.get("model.embed_tokens")
    if emb_qw is not None:
        if tuple(emb_qw.codes.shape) != (vocab, hidden):
            raise PteExportError("model.embed_tokens: quantized shape does not match the model")
        model.tok_embeddings = QuantEmbedding(emb_qw)
        storages.append(Storage("model.embed_tokens", "embedding", emb_qw.bits, emb_qw.bits, emb_qw.group_size,
                                hidden, vocab, model.tok_embeddings.scale_bytes,
                                "asymmetric" if emb_qw.zero_points is not None else None))
    else:
        storages.append(Storage("model.embed_tokens", "float", None, 32, None, hidden, vocab, 0))
    if tied:
        notes.append("tied embeddings: the table is stored twice (embedding kernel + lm_head linear)")

    from executorch.examples.models.llama.source_transformation.custom_kv_cache import (
        replace_kv_cache_with_custom_kv_cache,
    )
    from executorch.examples.models.llama.source_transformation.sdpa import replace_sdpa_with_custom_op

    if use_kv_cache:
        model = replace_sdpa_with_custom_op(model)
        model = replace_kv_cache_with_custom_kv_cache(model)
    return BuiltModel(model, storages, notes, tied, args.max_seq_len, args.max_context_len, args.n_layers, vocab)


def predicted_pte_bytes(storages: Iterable[Storage], cfg, max_context_len: int) -> int:
    """Weights as stored + norms + RoPE tables + fixed overhead."""
    total = sum(s.predicted_bytes for s in storages)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_norm = cfg.num_hidden_layers * 2 * cfg.hidden_size + cfg.hidden_size
    if cfg.model_type == "qwen3":
        n_norm += cfg.num_hidden_layers * 2 * head_dim
    total += 4 * n_norm
    total += 2 * 4 * max_context_len * head_dim  # cos/sin tables
    total += 64 * 1024  # flatbuffer, delegate headers, alignment padding
    return total


# --------------------------------------------------------------------------------------
# Reference in PyTorch (what the runtime computes)
# --------------------------------------------------------------------------------------


def _act_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    return _apply_int8_act_asym_per_token_quant_dequant(x)


def runtime_reference(hf_model: nn.Module, qweights: Mapping[str, Any], fake_quantized: nn.Module | None = None) -> nn.Module:
    """The HF model with dequantized weights and int8 per-token activation quant-dequant
    in front of every linear the .pte runs as a dynamically quantized GEMM (8da4w/8da8w).

    `fake_quantized` (e.g. `lieq_export.quantize.fake_quantize(model, qweights)`) is used
    when given; otherwise weights are replaced here from `qweights`.
    """
    ref = fake_quantized if fake_quantized is not None else copy.deepcopy(hf_model)
    if fake_quantized is None:
        with torch.no_grad():
            for path, qw in qweights.items():
                mod = ref.get_submodule(path)
                w = qw.dequantize().to(mod.weight.dtype)
                if _is_tied(ref) and path in ("lm_head", "model.embed_tokens"):
                    mod.weight = nn.Parameter(w, requires_grad=False)  # untie
                else:
                    mod.weight.data.copy_(w)
    for path in qweights:
        if path == "model.embed_tokens":
            continue
        ref.get_submodule(path).register_forward_pre_hook(lambda m, a: (_act_quant_dequant(a[0]),) + tuple(a[1:]))
    return ref.eval()


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "executorch", "torchao", "transformers", "lieq-export"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _special_ids(tokenizer, cfg) -> tuple[int | None, list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    eos = []
    for src in (getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
                getattr(cfg, "eos_token_id", None),
                getattr(getattr(cfg, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        for e in (src if isinstance(src, (list, tuple)) else [src]):
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    return (None if bos is None else int(bos)), eos


def _save_tokenizer_json(tokenizer, path: Path) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PteExportError("the tokenizer has no fast (tokenizers) backend; cannot write tokenizer.json")
    backend.save(str(path))


def lower_to_executorch(built: BuiltModel, metadata: dict, *, example_len: int = 3):
    """torch.export -> edge -> XNNPACK -> ExecuTorch program (returns the program manager)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )
    from executorch.extension.llm.export.builder import DType, LLMEdgeManager

    example_len = min(example_len, built.max_seq_len - 1)
    mgr = LLMEdgeManager(
        model=built.model,
        modelname="lieq",
        max_seq_len=built.max_seq_len,
        use_kv_cache=True,
        # forward(tokens, attn_options) with attn_options = {"input_pos": [start]}
        example_inputs=(
            torch.arange(2, 2 + example_len, dtype=torch.long).unsqueeze(0) % built.vocab_size,
            {"input_pos": torch.tensor([0], dtype=torch.long)},
        ),
        dtype=DType.fp32,
        enable_dynamic_shape=True,
        metadata=dict(metadata),
    )
    t = time.perf_counter()
    mgr.export()
    mgr.run_canonical_optimizations()
    t_export = time.perf_counter() - t
    t = time.perf_counter()
    if os.environ.get("LIEQ_PTE_PARTITIONER") == "per-op":
        # export_llm's layout: one partition per dynamically-quantized linear, then the rest
        parts = [XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()]
    else:
        # one partitioner, large partitions: lowering cost grows with partitions x graph size
        parts = [XnnpackPartitioner()]
    mgr.to_edge_transform_and_lower(parts)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    mgr.to_executorch()
    t_et = time.perf_counter() - t
    log.info("export %.1fs, lower %.1fs, to_executorch %.1fs", t_export, t_lower, t_et)
    return mgr, {"torch_export_s": round(t_export, 2), "lower_s": round(t_lower, 2), "to_executorch_s": round(t_et, 2)}


def export_pte(hf_model: nn.Module, tokenizer, qweights: Mapping[str, Any], plan=None, out_dir: str | os.PathLike = "bundle",
               *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, max_context_len: int | None = None,
               plan_json: str | None = None, extra_manifest: dict | None = None, tied: bool | None = None) -> dict:
    """Write model.pte, tokenizer.json, plan.json and manifest.json into the folder `out_dir`.

    `tied`: whether the source model ties lm_head to the embeddings (default: detected
    from `hf_model`; pass it for models rebuilt untied, e.g. from a checkpoint).
    Returns the manifest. Nothing partial is left behind on failure: the bundle is
    written in a temporary sibling folder and renamed into place.
    """
    from lieq_export.io import ensure_writable_dir

    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir.parent if str(out_dir.parent) else Path("."))
    t0 = time.perf_counter()
    cfg = hf_model.config
    built = build_et_model(hf_model, qweights, max_seq_len=max_seq_len, max_context_len=max_context_len, tied=tied)
    bos, eos = _special_ids(tokenizer, cfg)
    metadata = {
        "get_max_seq_len": built.max_seq_len,
        "get_max_context_len": built.max_context_len,
        "get_n_layers": built.n_layers,
        "get_vocab_size": built.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    if bos is not None:
        metadata["get_bos_id"] = bos
    if eos:
        metadata["get_eos_ids"] = eos
    mgr, timings = lower_to_executorch(built, metadata)
    buffer = mgr.export_program.buffer

    low_bits = sorted({s.grid_bits for s in built.storages if s.kind == "linear" and s.grid_bits in (2, 3)})
    warn_msgs = list(built.warnings)
    if low_bits:
        msg = (f"{'/'.join(map(str, low_bits))}-bit layers are stored in XNNPACK's int4 format: "
               f"they take 4 bits per weight on disk (same function, no size gain over 4-bit)")
        warnings.warn(msg, stacklevel=2)
        warn_msgs.append(msg)
    for m in built.warnings:
        if "fallback" in m or "re-quantized" in m:
            warnings.warn(m, stacklevel=2)

    from lieq_export.io import atomic_dir

    if plan_json is None and plan is not None:
        plan_json = plan.to_json() if hasattr(plan, "to_json") else json.dumps(plan)
    # The whole bundle is written in a temporary sibling folder and renamed into place.
    with atomic_dir(out_dir) as tmp:
        if tokenizer is not None:
            _save_tokenizer_json(tokenizer, tmp / TOKENIZER_FILE)
        if plan_json is not None:
            (tmp / PLAN_FILE).write_text(plan_json)
        (tmp / PTE_FILE).write_bytes(bytes(buffer))
        manifest = _manifest(hf_model, built, tmp, metadata, bos, eos, warn_msgs, timings, t0, plan)
        if extra_manifest:
            manifest.update(extra_manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _manifest(hf_model, built: BuiltModel, folder: Path, metadata, bos, eos, warn_msgs, timings, t0, plan) -> dict:
    cfg = hf_model.config
    pte_path, tok_path, plan_path = folder / PTE_FILE, folder / TOKENIZER_FILE, folder / PLAN_FILE
    predicted = predicted_pte_bytes(built.storages, cfg, built.max_context_len)
    layers = []
    for i in range(cfg.num_hidden_layers):
        ls = [s for s in built.storages if s.name.startswith(f"model.layers.{i}.")]
        layers.append({
            "index": i,
            "grid_bits": sorted({s.grid_bits for s in ls if s.grid_bits is not None}),
            "storage_bits": sorted({s.storage_bits for s in ls}),
            "group_size": sorted({s.group_size for s in ls if s.group_size}),
            "container": ("int4" if any(s.grid_bits in (2, 3) for s in ls) else None),
        })
    files = {p.name: p.stat().st_size for p in (pte_path, tok_path, plan_path) if p.exists()}
    manifest = {
        "format": "lieq-export/pte-bundle/1",
        "backend": "executorch-xnnpack",
        "architecture": type(hf_model).__name__,
        "files": files,
        "pte_bytes": files[PTE_FILE],
        "predicted_pte_bytes": predicted,
        "vocab_size": built.vocab_size,
        "bos_id": bos,
        "eos_ids": eos,
        "max_seq_len": built.max_seq_len,
        "max_context_len": built.max_context_len,
        "n_layers": built.n_layers,
        "tied_embeddings": built.tied,
        "tied_storage": "stored twice (quantized embedding table + lm_head linear)" if built.tied else None,
        "activation_quantization": "int8 asymmetric per token (dynamic) before every quantized linear",
        "kv_cache": "static, float32, custom sdpa_with_kv_cache op",
        "layers": layers,
        "weights": [s.as_dict() for s in built.storages],
        "metadata_methods": metadata,
        "warnings": warn_msgs,
        "timings_s": {**timings, "total_s": round(time.perf_counter() - t0, 2)},
        "versions": _versions(),
    }
    if plan is not None and hasattr(plan, "accounting"):
        with contextlib.suppress(Exception):
            from lieq_export.models import describe

            manifest["plan_predicted_pte_bytes"] = plan.accounting(describe(hf_model))["predicted_bytes"]["pte"]
    return manifest


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


# --------------------------------------------------------------------------------------
# Running a bundle
# --------------------------------------------------------------------------------------


class PteModel:
    """A .pte loaded through `executorch.runtime` (portable runtime + XNNPACK)."""

    def __init__(self, bundle_or_pte: str | os.PathLike):
        from executorch.runtime import Runtime

        load_runtime_ops()
        p = Path(bundle_or_pte)
        self.bundle = p if p.is_dir() else p.parent
        self.pte_path = p / PTE_FILE if p.is_dir() else p
        if not self.pte_path.is_file():
            raise PteExportError(f"{self.pte_path} does not exist")
        rt = Runtime.get()
        self.program = rt.load_program(str(self.pte_path))
        self.method = self.program.load_method("forward")
        self.meta = {}
        for name in self.program.method_names:
            if name != "forward":
                with contextlib.suppress(Exception):
                    v = self.program.load_method(name).execute([])
                    self.meta[name] = [x.item() if isinstance(x, torch.Tensor) else x for x in v]
        self.max_seq_len = int(self._meta1("get_max_seq_len", DEFAULT_MAX_SEQ_LEN))
        self.max_context_len = int(self._meta1("get_max_context_len", self.max_seq_len))
        self.vocab_size = int(self._meta1("get_vocab_size", 0))
        self.pos = 0

    def _meta1(self, key, default):
        v = self.meta.get(key)
        return v[0] if v else default

    def reset(self) -> None:
        # The KV cache is a mutable buffer; positions >= pos are masked by the custom SDPA.
        self.pos = 0

    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed tokens at the current position; returns float32 logits of the last one [vocab]."""
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        n = t.shape[1]
        if self.pos + n > self.max_context_len:
            raise PteExportError(f"sequence exceeds the model's context length {self.max_context_len}")
        out = None
        # prefill chunks are limited to max_seq_len - 1 tokens (export's dynamic dim)
        chunk = max(1, self.max_seq_len - 1)
        for s in range(0, n, chunk):
            part = t[:, s:s + chunk]
            out = self.method.execute([part, torch.tensor([self.pos], dtype=torch.long)])[0]
            self.pos += part.shape[1]
        return out.reshape(-1, out.shape[-1])[-1].float()

    def logits_per_position(self, tokens: list[int]) -> torch.Tensor:
        """Logits after every prefix of `tokens`, one decode step at a time: [len, vocab]."""
        self.reset()
        return torch.stack([self.step([tok]) for tok in tokens])

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 32, *, top_p: float | None = None,
                 temperature: float = 1.0, eos_ids: Iterable[int] = (), seed: int | None = None) -> list[int]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(eos_ids)
        self.reset()
        logits = self.step(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = sample(logits, top_p=top_p, temperature=temperature, generator=gen)
            out.append(nxt)
            if nxt in eos or self.pos >= self.max_context_len:
                break
            logits = self.step([nxt])
        return out


def sample(logits: torch.Tensor, *, top_p: float | None = None, temperature: float = 1.0, generator=None) -> int:
    if not top_p or temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sp, si = torch.sort(probs, descending=True)
    keep = torch.cumsum(sp, 0) - sp < top_p
    sp = torch.where(keep, sp, torch.zeros_like(sp))
    return int(si[torch.multinomial(sp / sp.sum(), 1, generator=generator)])


def read_manifest(bundle: str | os.PathLike) -> dict:
    p = Path(bundle) / MANIFEST_FILE
    if not p.is_file():
        raise PteExportError(f"{bundle} is not a .pte bundle (no {MANIFEST_FILE})")
    return json.loads(p.read_text())


def runner_generate(bundle: str | os.PathLike, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    echo: bool = False, stats: dict | None = None) -> str:
    """Generate with ExecuTorch's C++ TextLLMRunner (the stock on-device runner)."""
    load_runtime_ops()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    b = Path(bundle)
    runner = TextLLMRunner(str(b / PTE_FILE), str(b / TOKENIZER_FILE))
    pieces: list[str] = []
    cfg = GenerationConfig(echo=echo, max_new_tokens=max_new_tokens, temperature=temperature)

    def on_stats(s):
        if stats is not None:
            with contextlib.suppress(Exception):
                stats.update(json.loads(s.to_json_string()))

    runner.generate(prompt, cfg, pieces.append, on_stats)
    return "".join(pieces)


# --------------------------------------------------------------------------------------
# Command-line helpers (used by `lieq-export export --target pte` / `lieq-export generate`)
# --------------------------------------------------------------------------------------


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> dict:
    """Export a lieq-export quantized checkpoint folder to a .pte bundle."""
    from lieq_export.quantize import load_checkpoint

    model, tokenizer, plan, qweights = load_checkpoint(ckpt_dir)
    cfg_file = Path(ckpt_dir) / "config.json"
    tied = bool(json.loads(cfg_file.read_text()).get("tie_word_embeddings", False)) if cfg_file.is_file() else None
    return export_pte(model, tokenizer, qweights, plan, out_dir, max_seq_len=max_seq_len, tied=tied,
                      extra_manifest={"source_checkpoint": str(Path(ckpt_dir).resolve())})


def generate_text(bundle: str | os.PathLike, prompt: str, *, max_new_tokens: int = 64, top_p: float | None = None,
                  temperature: float = 1.0, seed: int | None = None, use_runner: bool = False) -> str:
    """Continuation of `prompt` from a bundle: greedy unless top_p is given."""
    man = read_manifest(bundle)
    b = Path(bundle)
    if use_runner:
        return runner_generate(b, prompt, max_new_tokens=max_new_tokens,
                               temperature=(temperature if top_p else 0.0))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(b / TOKENIZER_FILE))
    ids = tok.encode(prompt).ids
    if not ids:
        raise PteExportError("the prompt encodes to no tokens")
    m = PteModel(b)
    if len(ids) + max_new_tokens > m.max_context_len:
        max_new_tokens = max(0, m.max_context_len - len(ids))
    out = m.generate(ids, max_new_tokens, top_p=top_p, temperature=temperature, eos_ids=man.get("eos_ids") or (),
                     seed=seed)
    eos = set(man.get("eos_ids") or ())
    return tok.decode([t for t in out if t not in eos])
