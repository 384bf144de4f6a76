"""Apply a bit plan: quantize a model's tensors, build the fake-quant reference, save a checkpoint.

The quantized checkpoint is a folder: `quantized.safetensors` (codes, scales and zero
points of every quantized tensor, plus the float tensors left unquantized),
`plan.json`, and the model's config and tokenizer, so exporters rebuild the model
without requantizing anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import atomic_dir
from .models import describe
from .plan import BitPlan
from .quant import QuantizedWeight, quantize_rtn

CHECKPOINT_FILE = "quantized.safetensors"
PLAN_FILE = "plan.json"


class CheckpointError(ValueError):
    pass


def quantize_model(
    model: torch.nn.Module,
    plan: BitPlan,
    calib: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantized weights for every tensor the plan covers, keyed by module path."""
    layout = describe(model)
    plan.validate(layout)
    if plan.method == "gptq":
        from .gptq import gptq_quantize_model

        if calib is None:
            raise ValueError("GPTQ needs calibration windows; pass calib (LongTensor [n, seq_len])")
        return gptq_quantize_model(model, plan, calib, progress=progress)
    out = {}
    tensors = list(plan.quantized_tensors(layout))
    for spec, bits in tqdm(tensors, desc="quantize (rtn)", disable=not progress, leave=False):
        w = model.get_submodule(spec.path).weight
        out[spec.path] = quantize_rtn(w, bits, plan.group_size_for(bits, spec.in_features), plan.symmetric)
    return out


def fake_quantize(model: torch.nn.Module, qweights: dict[str, QuantizedWeight]) -> torch.nn.Module:
    """A copy of `model` whose quantized tensors hold their dequantized values: the reference."""
    ref = copy.deepcopy(model)
    layout = describe(model)
    if layout.tied:
        # The copy's embedding and lm_head may get different widths, so they stop sharing.
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone(), requires_grad=False)
        ref.config.tie_word_embeddings = False
    with torch.no_grad():
        for path, qw in qweights.items():
            mod = ref.get_submodule(path)
            mod.weight.copy_(qw.dequantize().to(mod.weight.dtype))
    return ref


def _tensor_keys(path: str) -> tuple[str, str, str]:
    return f"{path}.qcodes", f"{path}.qscales", f"{path}.qzeros"


def save_checkpoint(out_dir, model, tokenizer, plan: BitPlan, qweights: dict[str, QuantizedWeight]) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    meta = {}
    for path, qw in qweights.items():
        kc, ks, kz = _tensor_keys(path)
        tensors[kc] = qw.codes.contiguous()
        tensors[ks] = qw.scales.contiguous()
        if qw.zero_points is not None:
            tensors[kz] = qw.zero_points.contiguous()
        meta[path] = {"bits": qw.bits, "group_size": qw.group_size}
    quantized_params = {f"{p}.weight" for p in qweights}
    for name, t in model.state_dict().items():
        if name not in quantized_params:
            # clone: a tied lm_head shares storage with the embedding, which safetensors refuses
            tensors[name] = t.detach().clone().contiguous()
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_FILE), metadata={"lieq_export": json.dumps(meta)})
        plan.save(tmp / PLAN_FILE, describe(model))
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_checkpoint(ckpt_dir):
    """(reference model, tokenizer, plan, qweights): the model holds the dequantized weights."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(ckpt_dir)
    if not (d / CHECKPOINT_FILE).is_file() or not (d / PLAN_FILE).is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a lieq-export checkpoint (needs {CHECKPOINT_FILE} and {PLAN_FILE}); "
            "create one with `lieq-export quantize`"
        )
    plan = BitPlan.load(d / PLAN_FILE)
    with safe_open(str(d / CHECKPOINT_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lieq_export"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    qweights = {}
    for path, m in meta.items():
        kc, ks, kz = _tensor_keys(path)
        qweights[path] = QuantizedWeight(tensors.pop(kc), tensors.pop(ks), tensors.pop(kz, None), m["bits"], m["group_size"])
    config = AutoConfig.from_pretrained(d)
    # The reference keeps embedding and lm_head apart (they may differ in width), as
    # fake_quantize does; every tensor is in the file, so nothing relies on tying.
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(tensors)
    for path, qw in qweights.items():
        state[f"{path}.weight"] = qw.dequantize()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, AutoTokenizer.from_pretrained(d), plan, qweights
