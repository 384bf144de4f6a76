"""Speed / size of lieq-export .pte bundles on SmolLM2-135M vs ExecuTorch's own export_llm.

Variants (all XNNPACK, static KV cache, same max length):
  float32        no quantization
  uniform4       every linear 4-bit (8da4w, group 64), 4-bit embedding, 4-bit lm_head
  mixed48        {4,8} plan: first/last two layers 8-bit, others 4-bit; 8-bit embedding/lm_head
  export_llm     ExecuTorch's export_llm: 8da4w g64 + 4-bit (g32) embeddings, from the same
                 (GGUF-loaded) weights converted to its checkpoint format here

Each .pte is measured in a fresh subprocess: prefill of 128 tokens and decode of 128
tokens through `executorch.runtime` (tok/s), and TextLLMRunner's own stats, file size,
peak RSS. Writes benchmarks/results/speed_pte.json and speed_pte.png.

    python benchmarks/speed_pte.py [--max-seq-len 512] [--only uniform4,export_llm] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "_work_pte"
VARIANTS = ("float32", "uniform4", "mixed48", "export_llm")
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ") * 6


def _plan(name, layout):
    from lieq_export.plan import BitPlan, default_group_size

    g = default_group_size(layout)
    n = layout.num_layers
    if name == "uniform4":
        return BitPlan((4,) * n, g, symmetric=True, embed_bits=4, lm_head_bits=4, allocator="uniform")
    if name == "mixed48":
        bits = tuple(8 if i < 2 or i >= n - 2 else 4 for i in range(n))
        return BitPlan(bits, g, symmetric=True, embed_bits=8, lm_head_bits=8, allocator="manual")
    return None


def export_variant(name: str, max_seq_len: int) -> dict:

    from lieq_export.backends import pte
    from lieq_export.models import describe, load_model
    from lieq_export.quantize import quantize_model

    model, tok = load_model("smollm2-135m")
    layout = describe(model)
    out = WORK / name
    t0 = time.perf_counter()
    if name == "export_llm":
        return export_llm_variant(model, tok, out, max_seq_len)
    plan = _plan(name, layout)
    qweights = quantize_model(model, plan, progress=False) if plan else {}
    t_q = time.perf_counter() - t0
    man = pte.export_pte(model, tok, qweights, plan, out, max_seq_len=max_seq_len)
    return {"pte": str(out / pte.PTE_FILE), "tokenizer": str(out / pte.TOKENIZER_FILE),
            "export_s": round(time.perf_counter() - t0, 1), "quantize_s": round(t_q, 1),
            "predicted_bytes": man["predicted_pte_bytes"],
            "plan_predicted_bytes": (plan.accounting(layout)["predicted_bytes"]["pte"] if plan else None),
            "timings": man["timings_s"]}


def export_llm_variant(model, tok, out: Path, max_seq_len: int) -> dict:
    import torch
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import LlmConfig

    from lieq_export.backends import pte

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # checkpoint in ExecuTorch's Llama key format; q/k rows stay in HF layout (use_hf_rope)
    sd = {k: v.contiguous().clone() for k, v in pte._hf_float_state_dict(model).items()}
    torch.save(sd, out / "checkpoint.pth")
    args = pte.model_args_for(model.config, max_seq_len=max_seq_len)
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                                            "head_dim", "norm_eps", "rope_theta", "use_hf_rope", "use_qk_norm",
                                            "qk_norm_before_rope", "attention_qkv_bias")}
    (out / "params.json").write_text(json.dumps(params))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = pte._special_ids(tok, model.config)
    cfg = LlmConfig()
    cfg.base.checkpoint = str(out / "checkpoint.pth")
    cfg.base.params = str(out / "params.json")
    cfg.base.metadata = json.dumps({"get_bos_id": bos, "get_eos_ids": eos})
    cfg.model.use_kv_cache = True
    cfg.model.use_sdpa_with_kv_cache = True
    cfg.model.enable_dynamic_shape = True
    cfg.export.max_seq_length = max_seq_len
    cfg.export.max_context_length = max_seq_len
    cfg.export.output_dir = str(out)
    cfg.export.output_name = str(out / "model.pte")  # a name ending in .pte is taken as a path
    cfg.quantization.qmode = "8da4w"
    cfg.quantization.group_size = 64
    cfg.quantization.embedding_quantize = "4,32"
    cfg.backend.xnnpack.enabled = True
    cfg.backend.xnnpack.extended_ops = True
    t1 = time.perf_counter()
    export_llama(cfg)
    return {"pte": str(out / "model.pte"), "tokenizer": str(out / "tokenizer.json"),
            "export_s": round(time.perf_counter() - t0, 1), "export_llama_s": round(time.perf_counter() - t1, 1)}


def measure(pte_path: str, tokenizer: str, n_prefill: int = 128, n_decode: int = 128) -> dict:
    """Runs in a fresh process: tok/s through executorch.runtime, then TextLLMRunner stats."""
    import torch

    from lieq_export.backends import pte

    t = time.perf_counter()
    m = pte.PteModel(pte_path)
    load_s = time.perf_counter() - t
    ids = (torch.arange(n_prefill) * 7 + 11) % 1000 + 100
    m.reset()
    m.step(ids[:8].tolist())  # warm-up
    pre = []
    for _ in range(3):
        m.reset()
        t = time.perf_counter()
        logits = m.step(ids.tolist())
        pre.append(time.perf_counter() - t)
    nxt = int(logits.argmax())
    t = time.perf_counter()
    for _ in range(n_decode):
        nxt = int(m.step([nxt]).argmax())
    dec = time.perf_counter() - t
    res = {"load_s": round(load_s, 3), "prefill_tok_s": round(n_prefill / min(pre), 1),
           "decode_tok_s": round(n_decode / dec, 1)}
    try:
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        r = TextLLMRunner(pte_path, tokenizer)
        stats = {}

        def on_stats(s):
            stats.update(json.loads(s.to_json_string()))

        cfg = GenerationConfig(echo=False, max_new_tokens=n_decode, temperature=0.0, seq_len=-1)
        r.generate(PROMPT, cfg, lambda s: None, on_stats)
        r.reset()
        stats.clear()
        r.generate(PROMPT, cfg, lambda s: None, on_stats)
        scale = stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)
        n_prompt, n_gen = stats.get("prompt_tokens", 0), stats.get("generated_tokens", 0)
        pf = (stats["prompt_eval_end_ms"] - stats["inference_start_ms"]) / scale
        gen = (stats["inference_end_ms"] - stats["prompt_eval_end_ms"]) / scale
        res["runner"] = {"prompt_tokens": n_prompt, "generated_tokens": n_gen,
                         "prefill_tok_s": round(n_prompt / pf, 1) if pf > 0 else None,
                         "decode_tok_s": round(n_gen / gen, 1) if gen > 0 else None}
    except Exception as e:  # the runner is optional for the measurement
        res["runner_error"] = f"{type(e).__name__}: {e}"
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def _child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("size_mb", "prefill_tok_s", "decode_tok_s"),
                              ("file size (MB)", "prefill tok/s (128)", "decode tok/s (128)")):
        vals = [rows[n].get(key) or 0 for n in names]
        ax.bar(names, vals, color=["#888", "#3a7", "#37a", "#a73"][: len(names)])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("SmolLM2-135M .pte (XNNPACK) on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="reuse .pte files already in the work folder")
    ap.add_argument("--_export", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._export:
        print("RESULT " + json.dumps(export_variant(a._export, a.max_seq_len)), flush=True)
        return 0
    if a._measure:
        print("RESULT " + json.dumps(measure(*a._measure)), flush=True)
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    prev = RESULTS / "speed_pte.json"
    rows = json.loads(prev.read_text())["variants"] if (a.reuse and prev.exists()) else {}
    for name in a.only.split(","):
        pte_file = WORK / name / "model.pte"
        if a.reuse and pte_file.exists():
            info = rows.get(name) or {"pte": str(pte_file), "tokenizer": str(WORK / name / "tokenizer.json")}
            man = WORK / name / "manifest.json"
            if "export_s" not in info and man.exists():
                info["export_s"] = json.loads(man.read_text())["timings_s"]["total_s"]
        else:
            print(f"[{name}] exporting ...", flush=True)
            info = _child(["--_export", name, "--max-seq-len", str(a.max_seq_len)])
            print(f"[{name}] exported in {info['export_s']} s", flush=True)
        print(f"[{name}] measuring ...", flush=True)
        info.update(_child(["--_measure", info["pte"], info["tokenizer"]]))
        info["size_mb"] = round(os.path.getsize(info["pte"]) / 1e6, 2)
        rows[name] = info
        (RESULTS / "speed_pte.json").write_text(json.dumps({"variants": rows}, indent=2))

    base = rows.get("export_llm")
    print(f"\n{'variant':<12}{'size MB':>9}{'prefill t/s':>13}{'decode t/s':>12}{'runner dec':>12}"
          f"{'RSS MB':>9}{'export s':>10}{'dec vs export_llm':>19}")
    for name, r in rows.items():
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        rd = (r.get("runner") or {}).get("decode_tok_s")
        print(f"{name:<12}{r['size_mb']:>9.1f}{r['prefill_tok_s']:>13.1f}{r['decode_tok_s']:>12.1f}"
              f"{(rd or 0):>12.1f}{r['peak_rss_mb']:>9.0f}{r.get('export_s', 0):>10.0f}{ratio:>19}")
    summary = {"variants": rows, "machine": {"cpus": os.cpu_count()}, "max_seq_len": a.max_seq_len,
               "ratios_vs_export_llm": ({n: {"size": round(r["size_mb"] / base["size_mb"], 3),
                                             "prefill": round(r["prefill_tok_s"] / base["prefill_tok_s"], 3),
                                             "decode": round(r["decode_tok_s"] / base["decode_tok_s"], 3)}
                                         for n, r in rows.items()} if base else None)}
    (RESULTS / "speed_pte.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "speed_pte.png")
    print(f"\nwrote {RESULTS / 'speed_pte.json'} and {RESULTS / 'speed_pte.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
