"""Tiny bundles for the chat and contract tests, built once per test session.

The model is test_pte's tiny BPE tokenizer + a one-layer Llama trained for a few steps
on test_pte's TEXT (so greedy continuations are words, not noise), quantized at 4 bits
(group 32, symmetric), float embeddings and lm_head: the smallest plan both exporters
take without fallbacks. Bundles are cached under pytest's session base temp folder, so
every test module that asks for one shares the same files.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from conftest import tiny_config
from test_pte import fit_text, make_tokenizer

# Used by the chat tests: a template with a visible marker, and the prompt/answer text.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_SEQ_LEN = 128


@functools.lru_cache(maxsize=None)
def tiny_model_and_tokenizer():
    from transformers import AutoModelForCausalLM

    from lieq_export.plan import BitPlan
    from lieq_export.quantize import quantize_model

    tok = make_tokenizer(None)
    tok.chat_template = CHAT_TEMPLATE
    cfg = tiny_config("llama", layers=1, hidden=64, vocab=320)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fit_text(model, tok, steps=40, lr=1e-2)
    plan = BitPlan((4,), group_size=32, symmetric=True, embed_bits=None, lm_head_bits=None)
    return model, tok, plan, quantize_model(model, plan, progress=False)


def pte_bundle(base: Path) -> Path:
    """model.pte + tokenizer.json + plan.json + manifest.json (about a minute: XNNPACK lowering)."""
    out = Path(base) / "tiny_pte_bundle"
    if not (out / "manifest.json").is_file():
        from lieq_export.backends import pte

        model, tok, plan, q = tiny_model_and_tokenizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pte.export_pte(model, tok, q, plan, out, max_seq_len=MAX_SEQ_LEN)
    return out


def onnx_bundle(base: Path) -> Path:
    """model.onnx + tokenizer files (with the chat template) + genai_config + plan + manifest (seconds)."""
    out = Path(base) / "tiny_onnx_bundle"
    if not (out / "manifest.json").is_file():
        from lieq_export.backends import onnx as ox

        model, tok, plan, q = tiny_model_and_tokenizer()
        ox.export_onnx(model, q, out, tokenizer=tok, plan=plan, max_length=MAX_SEQ_LEN)
    return out
