"""A bit plan as input for other quantizers: llama.cpp, GPTQModel and AutoRound.

Pure functions of (plan, layout); nothing here imports those tools. Each output follows
the syntax the tool documents (sources named per function).
"""

from __future__ import annotations

import json
import shlex
from collections import Counter

from .models import ModelLayout
from .plan import BitPlan

FORMATS = ("json", "llama.cpp", "gptqmodel", "autoround")

# Hugging Face projection name -> GGUF tensor name (convert_hf_to_gguf, Llama/Qwen3).
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
QK_K = 256  # k-quant super-block: row length must be a multiple of this
# Positional type for llama-quantize, by the plan's most common width.
LLAMA_BASE_FTYPE = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 8: "Q8_0"}


def llama_cpp_type(bits: int, in_features: int, symmetric: bool) -> str:
    """The ggml type for one tensor of ``bits`` whose rows are ``in_features`` long."""
    if bits == 8:
        return "q8_0"
    if in_features % QK_K == 0:
        return {2: "q2_k", 3: "q3_k", 4: "q4_k"}[bits]
    # No k-quant fits this row length; the 32-element legacy types do (llama.cpp's own
    # fallback would widen q2_k/q3_k to q4_0 and q4_k to q5_0 instead).
    return "q4_0" if symmetric else "q4_1"


def llama_cpp_args(plan: BitPlan, layout: ModelLayout) -> list[str]:
    """Arguments for llama.cpp's ``llama-quantize``: ``[options..., BASE_TYPE]``.

    Syntax (ggml-org/llama.cpp tools/quantize/README.md and tools/quantize/quantize.cpp,
    ``parse_tensor_type``): ``--tensor-type PATTERN=TYPE``, repeatable. PATTERN is a
    std::regex searched (``regex_search``) in the GGUF tensor name, e.g.
    ``blk.3.attn_q.weight``, and lower-cased; TYPE is a ggml type name, compared
    case-insensitively. ``--token-embedding-type`` / ``--output-tensor-type`` set
    ``token_embd.weight`` / ``output.weight``. Overrides are honoured only when the
    positional base type is a quantized type (src/llama-quant.cpp), so the last element
    returned is that base type (an ftype; every weight the plan covers is overridden,
    so it only names the file type). Patterns are anchored (``^...\\.weight$``) so no
    two overlap: llama.cpp versions differ on whether the first or last match wins.

    Width mapping (llama.cpp has no grid with the plan's group structure: k-quants use
    256-weight super-blocks with their own sub-block scales, legacy types 32-weight
    blocks, so the plan's ``group_size`` is not carried over):

    - 2 -> q2_k, 3 -> q3_k, 4 -> q4_k, when the row length (in_features) is a multiple
      of 256. q4_k rather than q4_0/q4_1: it is the 4-bit member of the same k-quant
      family as q2_k/q3_k, with finer (32-weight) sub-block scales and mins.
    - rows not a multiple of 256 (e.g. SmolLM2's 576-wide attention inputs): k-quants
      cannot store them (llama.cpp would fall back on its own), so 2, 3 and 4 bits all
      take q4_0 (symmetric plan) or q4_1 (asymmetric: scale + min), the 32-block types;
      2/3-bit layers are widened to 4 bits, as XNNPACK's container does.
    - 8 -> q8_0 (32-weight blocks, symmetric; the plan's per-channel 8-bit has no
      llama.cpp equivalent).
    - embedding / lm_head at 4 or 8 bits: the same mapping, through the dedicated
      options. Float (``None``): the option is left out, so llama.cpp applies its
      default mixture to that tensor (add ``--leave-output-tensor`` to keep
      output.weight unquantized; there is no such switch for token_embd).
      A tied model has no ``output.weight`` in GGUF, so lm_head_bits is not emitted.
    """
    plan.validate(layout)
    args: list[str] = []
    for layer, bits in zip(layout.layers, plan.layer_bits):
        by_type: dict[str, list[str]] = {}
        for spec in layer.linears:
            t = llama_cpp_type(bits, spec.in_features, plan.symmetric)
            by_type.setdefault(t, []).append(GGUF_NAMES[spec.name])
        for t, names in by_type.items():
            alt = names[0] if len(names) == 1 else "(" + "|".join(names) + ")"
            args += ["--tensor-type", rf"^blk\.{layer.index}\.{alt}\.weight$={t}"]
    if plan.embed_bits:
        args += ["--token-embedding-type", llama_cpp_type(plan.embed_bits, layout.embed.in_features, plan.symmetric)]
    if plan.lm_head_bits and not layout.tied:
        args += ["--output-tensor-type", llama_cpp_type(plan.lm_head_bits, layout.lm_head.in_features, plan.symmetric)]
    args.append(LLAMA_BASE_FTYPE[_base_bits(plan)])
    return args


def _base_bits(plan: BitPlan) -> int:
    """Most common layer width (ties: the wider one)."""
    counts = Counter(plan.layer_bits)
    return max(counts, key=lambda b: (counts[b], b))


def _gptq_group(plan: BitPlan, bits: int) -> int:
    # GPTQ-style tools write per-output-channel (one group per row) as group_size -1.
    return -1 if bits == 8 else plan.group_size


def gptqmodel_dynamic(plan: BitPlan, layout: ModelLayout) -> dict:
    """GPTQModel ``QuantizeConfig`` fields with a ``dynamic`` per-module override dict.

    Syntax (ModelCloud/GPTQModel README, "dynamic"; the same comment is kept in vLLM's
    gptq config): keys are regexes on the module path, ``+:`` a positive match (the
    default when there is no prefix) whose dict overrides ``bits``/``group_size``/...,
    ``-:`` a negative match (module left unquantized), e.g.
    ``r"+:.*\\.(?:1[6-9]|20|21)\\..*": {"bits": 8, "group_size": 64}``.

    Base ``bits`` is the most common layer width; every decoder layer at another width
    gets one ``+:`` rule anchored on ``model.layers.N.`` (so layer 1 does not also match
    11). 8-bit is per output channel: ``group_size`` -1. ``sym`` is the plan's;
    ``desc_act`` is the plan's ``act_order`` when the method is GPTQ (RTN has no column
    order). Embeddings: GPTQModel does not quantize them, so ``embed_bits`` is not
    representable (reported in ``_unrepresented``). lm_head: ``lm_head: true`` plus a
    ``+:^lm_head$`` rule when the plan quantizes it and the model is untied.
    """
    plan.validate(layout)
    base = _base_bits(plan)
    dynamic = {}
    for layer, bits in zip(layout.layers, plan.layer_bits):
        if bits != base:
            dynamic[rf"+:^model\.layers\.{layer.index}\..*"] = {"bits": bits, "group_size": _gptq_group(plan, bits)}
    lm_head = bool(plan.lm_head_bits) and not layout.tied
    if lm_head:
        dynamic[r"+:^lm_head$"] = {"bits": plan.lm_head_bits, "group_size": _gptq_group(plan, plan.lm_head_bits)}
    cfg = {
        "bits": base,
        "group_size": _gptq_group(plan, base),
        "sym": plan.symmetric,
        "desc_act": bool(plan.act_order and plan.method == "gptq"),
        "lm_head": lm_head,
        "dynamic": dynamic,
    }
    missing = []
    if plan.embed_bits:
        missing.append(f"embed_tokens at {plan.embed_bits} bits (GPTQModel leaves embeddings float)")
    if plan.lm_head_bits and layout.tied:
        missing.append(f"lm_head at {plan.lm_head_bits} bits (tied to the embedding)")
    if missing:
        cfg["_unrepresented"] = missing
    return cfg


def autoround_layer_config(plan: BitPlan, layout: ModelLayout) -> dict:
    """AutoRound ``layer_config``: {module name: {"bits", "group_size", "sym"}}.

    Syntax (intel/auto-round README.md and docs/step_by_step.md, mixed bits:
    ``layer_config = {"model.decoder.layers.6.self_attn.out_proj": {"bits": 8,
    "group_size": 32}}``; keys are full module names, fuzzy matching also allowed).
    Every decoder linear is listed by its full name; 8-bit is per output channel
    (``group_size`` -1). lm_head is listed when the plan quantizes it and the model is
    untied; embeddings are not linears and AutoRound's layer_config does not cover them,
    so embed_bits is left out (like a float lm_head).
    """
    plan.validate(layout)
    out = {}
    for layer, bits in zip(layout.layers, plan.layer_bits):
        for spec in layer.linears:
            out[spec.path] = {"bits": bits, "group_size": _gptq_group(plan, bits), "sym": plan.symmetric}
    if plan.lm_head_bits and not layout.tied:
        b = plan.lm_head_bits
        out[layout.lm_head.path] = {"bits": b, "group_size": _gptq_group(plan, b), "sym": plan.symmetric}
    return out


def render(fmt: str, plan: BitPlan, layout: ModelLayout) -> str:
    """The text ``lieq-export plan --format FMT`` prints."""
    if fmt == "json":
        return plan.to_json(layout)
    if fmt == "llama.cpp":
        args = llama_cpp_args(plan, layout)
        return "llama-quantize " + shlex.join(args[:-1] + ["MODEL-F32.gguf", "OUT.gguf", args[-1]])
    if fmt == "gptqmodel":
        return json.dumps(gptqmodel_dynamic(plan, layout), indent=2)
    if fmt == "autoround":
        return json.dumps(autoround_layer_config(plan, layout), indent=2)
    raise ValueError(f"format {fmt!r} is unknown; use one of {FORMATS}")


__all__ = ["FORMATS", "llama_cpp_args", "gptqmodel_dynamic", "autoround_layer_config", "render", "llama_cpp_type"]
