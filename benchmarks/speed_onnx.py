"""Speed / size of lieq-export ONNX bundles on SmolLM2-135M with onnxruntime (CPU).

Variants (RTN, asymmetric, group 64):
  float32    no quantization (tied embedding/lm_head stored once)
  int4       every decoder linear 4-bit, 4-bit embedding and lm_head
  int2       every decoder linear 2-bit (INT2 on disk), 4-bit embedding and lm_head
  mixed24    {2,4} plan: the first 8 and last 7 layers 4-bit, the middle 15 layers 2-bit;
             4-bit embedding and lm_head (about 3 bits per decoder weight)

Each bundle is timed in a fresh subprocess that imports only numpy + onnxruntime
(no torch), with onnxruntime's MatMulNBits at
  acc1  accuracy_level 1: float32 compute (what the bundles ask for; matches the reference)
  acc4  accuracy_level 4: int8 activations (onnxruntime's default for fused DQ->MatMul);
        its drift from acc1 is reported (max/median relative logit difference and top-1
        agreement over the 128 prefill positions)
prefill: one forward over a 128-token prompt (tok/s); decode: 128 single-token steps
with the KV cache (tok/s, median step). Peak RSS of the subprocess. llama.cpp on the
package's Q4_1 GGUF is added when `llama_cpp` is importable.

    python benchmarks/speed_onnx.py [--only int4,int2] [--reuse] [--threads 2]

Writes benchmarks/results/speed_onnx.json and speed_onnx.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "_work_onnx"
VARIANTS = ("float32", "int4", "int2", "mixed24")
ACCURACY_LEVELS = (1, 4)
PREFILL = 128
DECODE = 128
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ") * 8


def _plan(name, layout):
    from lieq_export.plan import BitPlan

    n = layout.num_layers
    if name == "int4":
        bits = (4,) * n
    elif name == "int2":
        bits = (2,) * n
    elif name == "mixed24":
        bits = tuple(4 if i < 8 or i >= n - 7 else 2 for i in range(n))
    else:
        return None
    return BitPlan(bits, 64, symmetric=False, embed_bits=4, lm_head_bits=4, allocator="manual")


def export_all(names, reuse: bool) -> dict:
    from lieq_export.backends import onnx as ox
    from lieq_export.models import describe, load_model
    from lieq_export.quantize import quantize_model

    out = {}
    model = tok = None
    for name in names:
        bundle = WORK / name
        if reuse and ox.is_bundle(bundle):
            out[name] = {"bundle": str(bundle), "manifest": ox.load_manifest(bundle), "reused": True}
            continue
        if model is None:
            model, tok = load_model("smollm2-135m")
            layout = describe(model)
        plan = _plan(name, layout)
        t0 = time.perf_counter()
        qw = quantize_model(model, plan, progress=False) if plan else {}
        tq = time.perf_counter() - t0
        man = ox.export_onnx(model, qw, bundle, tokenizer=tok, plan=plan, max_length=2048)
        out[name] = {"bundle": str(bundle), "manifest": man, "quantize_s": round(tq, 1),
                     "export_s": man["export_seconds"]}
        print(f"exported {name}: {man['onnx_bytes'] / 1e6:.1f} MB in {tq + man['export_seconds']:.0f} s", flush=True)
    return out


# ---- measured in a subprocess: numpy + onnxruntime only ------------------------------


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(bundle: str, accuracy_level: int, threads: int, spin: bool) -> dict:
    import numpy as np

    from tokenizers import Tokenizer

    from lieq_export.backends.onnx import OnnxDecoder

    t0 = time.perf_counter()
    rss0 = _hwm_mb()
    load0 = os.getloadavg()[0]
    dec = OnnxDecoder(bundle, accuracy_level=accuracy_level, threads=threads,
                      config={"session.intra_op.allow_spinning": "1" if spin else "0"})
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(Path(bundle) / "tokenizer.json"))
    ids = np.array([tok.encode(PROMPT).ids[:PREFILL]], np.int64)
    assert ids.shape[1] == PREFILL
    mask = np.ones_like(ids)
    # warm-up (first run allocates and pre-packs)
    dec.step(ids[:, :8], mask[:, :8], dec.empty_cache())
    pre = []
    for _ in range(3):
        t = time.perf_counter()
        lg, cache = dec.step(ids, mask, dec.empty_cache())
        pre.append(time.perf_counter() - t)
    np.save(Path(bundle) / f"prefill_logits_acc{accuracy_level}.npy", lg[0])
    steps = []
    nxt = np.array([[int(lg[0, -1].argmax())]], np.int64)
    generated = []
    for _ in range(DECODE):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        t = time.perf_counter()
        lg, cache = dec.step(nxt, mask, cache)
        steps.append(time.perf_counter() - t)
        nxt = np.array([[int(lg[0, -1].argmax())]], np.int64)
        generated.append(int(nxt[0, 0]))
    return {
        "accuracy_level": accuracy_level,
        "threads": threads,
        "spinning": spin,
        "loadavg_1min_before": round(load0, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "session_load_s": round(load_s, 2),
        "prefill_tok_s": round(PREFILL / min(pre), 1),
        "decode_tok_s": round(1 / float(np.median(steps)), 1),
        "decode_total_s": round(sum(steps), 2),
        "peak_rss_mb": round(_hwm_mb(), 1),
        "rss_before_session_mb": round(rss0, 1),
        "torch_imported": "torch" in sys.modules,
        "text": tok.decode(generated[:24]),
    }


def measure_llama_cpp(threads: int) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    code = f"""
import json, resource, time, sys
from llama_cpp import Llama
sys.path.insert(0, {str(HERE.parent)!r})
from lieq_export.models import builtin_model_file
p = str(builtin_model_file("smollm2-135m"))
llm = Llama(p, n_ctx=512, n_threads={threads}, verbose=False)
ids = llm.tokenize({PROMPT!r}.encode())[:{PREFILL}]
t = time.perf_counter(); llm.eval(ids); pre = time.perf_counter() - t
t = time.perf_counter()
for _ in range({DECODE}):
    tok = llm.sample(temp=0.0) if hasattr(llm, "sample") else 0
    llm.eval([tok])
dec = time.perf_counter() - t
import os
print(json.dumps({{"prefill_tok_s": round({PREFILL}/pre, 1), "decode_tok_s": round({DECODE}/dec, 1),
  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, 1), "file_bytes": os.path.getsize(p)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["variants"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    w = 0.38
    for k, (key, title) in enumerate((("prefill_tok_s", f"prefill tok/s ({PREFILL} tokens)"),
                                      ("decode_tok_s", "decode tok/s"))):
        ax = axes[k]
        for j, lvl in enumerate(ACCURACY_LEVELS):
            vals = [results["variants"][n]["runs"].get(f"acc{lvl}", {}).get(key, 0) for n in names]
            ax.bar([i + (j - 0.5) * w for i in range(len(names))], vals, w, label=f"accuracy_level {lvl}")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar(names, [results["variants"][n]["onnx_bytes"] / 1e6 for n in names], color="gray")
    ax.set_title("model.onnx MB")
    fig.suptitle(f"SmolLM2-135M, onnxruntime {results['versions'].get('onnxruntime')}, "
                 f"{results['threads']} threads, {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already under results/_work_onnx")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--spin", action="store_true",
                    help="let onnxruntime's threads spin (faster on an idle machine, much slower on a shared one)")
    ap.add_argument("--measure", nargs=2, metavar=("BUNDLE", "LEVEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.threads, args.spin)))
        return 0

    names = args.only.split(",") if args.only else list(VARIANTS)
    bad = set(names) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants {sorted(bad)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    exported = export_all(names, args.reuse)
    from lieq_export.backends.onnx import _versions

    import platform

    results = {"model": "smollm2-135m", "threads": args.threads, "spinning": args.spin, "prefill_tokens": PREFILL,
               "decode_tokens": DECODE, "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "versions": _versions(), "variants": {}}
    for name in names:
        man = exported[name]["manifest"]
        entry = {"onnx_bytes": man["onnx_bytes"], "predicted_onnx_bytes": man.get("predicted_onnx_bytes"),
                 "avg_grid_bits": man.get("avg_grid_bits"), "avg_storage_bits": man.get("avg_storage_bits"),
                 "layer_storage_bits": [l["storage_bits"] for l in man["layers"]], "runs": {}}
        for lvl in ACCURACY_LEVELS:
            r = subprocess.run([sys.executable, __file__, "--measure", exported[name]["bundle"], str(lvl),
                                "--threads", str(args.threads)] + (["--spin"] if args.spin else []), capture_output=True, text=True, timeout=900,
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            if r.returncode:
                entry["runs"][f"acc{lvl}"] = {"error": r.stderr[-800:]}
                print(f"{name} acc{lvl}: FAILED\n{r.stderr[-800:]}", file=sys.stderr)
                continue
            entry["runs"][f"acc{lvl}"] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name} acc{lvl}: {entry['runs'][f'acc{lvl}']}", flush=True)
        import numpy as np

        f1 = Path(exported[name]["bundle"]) / "prefill_logits_acc1.npy"
        f4 = Path(exported[name]["bundle"]) / "prefill_logits_acc4.npy"
        if f1.is_file() and f4.is_file():
            a, b = np.load(f4), np.load(f1)
            rel = np.abs(a - b).max(-1) / np.abs(b).max(-1)
            entry["acc4_vs_acc1"] = {"max_rel_logit_diff": round(float(rel.max()), 4),
                                     "median_rel_logit_diff": round(float(np.median(rel)), 4),
                                     "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4)}
        results["variants"][name] = entry
    loads = [r["loadavg_1min_before"] for e in results["variants"].values() for r in e["runs"].values() if "error" not in r]
    if loads and max(loads) > (os.cpu_count() or 1):
        results["note"] = (f"shared machine: 1-min load average {min(loads)}-{max(loads)} on {os.cpu_count()} cores "
                           "during the runs; tok/s are lower bounds, compare variants only relative to each other")
    lc = measure_llama_cpp(args.threads)
    results["llama_cpp_q4_1"] = lc if lc is not None else "skipped: llama_cpp is not importable"

    print()
    print(f"{'variant':<9} {'MB':>7} {'bits':>5} {'level':>5} {'prefill tok/s':>13} {'decode tok/s':>12} "
          f"{'peak RSS MB':>11} {'top1 vs acc1':>12}")
    for name, e in results["variants"].items():
        for key, r in e["runs"].items():
            if "error" in r:
                continue
            bits = f"{e['avg_storage_bits']:.2f}" if e["avg_storage_bits"] else "32"
            print(f"{name:<9} {e['onnx_bytes'] / 1e6:>7.1f} {bits:>5} {r['accuracy_level']:>5} "
                  f"{r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} {r['peak_rss_mb']:>11.1f} "
                  + (f"{e['acc4_vs_acc1']['top1_agreement']:>12.3f}" if key == "acc4" and "acc4_vs_acc1" in e else f"{'':>12}"))
    if isinstance(lc, dict) and "error" not in lc:
        print(f"{'llama.cpp':<9} {lc['file_bytes'] / 1e6:>7.1f} {'Q4_1':>5} {'-':>5} {lc['prefill_tok_s']:>13.1f} "
              f"{lc['decode_tok_s']:>12.1f} {lc['peak_rss_mb']:>11.1f}")
    (RESULTS / "speed_onnx.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "speed_onnx.png")
    print(f"wrote {RESULTS / 'speed_onnx.json'} and {RESULTS / 'speed_onnx.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
