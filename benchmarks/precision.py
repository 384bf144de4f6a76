"""How precisely quality.py's evaluation separates allocators at the target budgets.

quality.py evaluates each plan on 8 x 512 tokens. Here the plans of its {3,4} rows are
evaluated again on more windows of the same held-out years (default the last 64 x 512,
whose last 8 are quality.py's), keeping each window's NLL, so that every allocator's PPL
ratio to the ΔPPL oracle's plan gets a paired bootstrap 95 % interval (windows resampled,
the same resample for both plans). The ratio on the last 8 windows alone is printed beside
it: it must reproduce quality.md.

    python benchmarks/precision.py --methods rtn
    python benchmarks/precision.py --methods gptq --allocators oracle,qerror,qerror_local --name precision_gptq
    python benchmarks/precision.py --merge precision_rtn.json,precision_gptq.json

Writes benchmarks/results/precision.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (  # noqa: E402
    QERROR_OTHERS, add_common_args, budgets, elapsed_log, load_common, plans, score_qerror_variants,
    score_variants, windows_for, write_results,
)

from lieq_export.evaluate import compare, reference_logprobs  # noqa: E402
from lieq_export.io import atomic_write_text  # noqa: E402
from lieq_export.plan import BitPlan  # noqa: E402
from lieq_export.quantize import fake_quantize, quantize_model  # noqa: E402
from lieq_export.scoring import delta_ppl  # noqa: E402

QUALITY_WINDOWS = 8  # quality.py's --eval-windows in the committed run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, gptq_calib=8)
    ap.add_argument("--eval-years", default="1990-2021")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--methods", default="rtn")
    ap.add_argument("--allocators", default="lieq,qerror,qerror_local,random,oracle")
    ap.add_argument("--labels", default="{3,4} 3.2;{3,4} 3.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--boot", type=int, default=10000, help="bootstrap resamples")
    ap.add_argument("--name", default="precision")
    ap.add_argument("--merge", default=None, help="combine finished runs (comma-separated JSON files) into --name")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = [json.loads((out / p).read_text()) for p in args.merge.split(",")]
        for r in runs[1:]:
            for key in ("model", "calibration", "evaluation", "float_window_nll"):
                if r[key] != runs[0][key]:
                    raise SystemExit(f"runs differ in {key}; cannot merge")
        keys = [(row["method"], row["label"], row["allocator"], row["seed"]) for r in runs for row in r["rows"]]
        if len(set(keys)) < len(keys) or any(r.get("partial") for r in runs):
            raise SystemExit("runs overlap or one is partial; merge finished runs of different rows")
        return write(out, args.name, {**runs[0], "rows": [row for r in runs for row in r["rows"]],
                                      "total_s": max(r["total_s"] for r in runs)}, args.boot)
    if "oracle" not in args.allocators.split(","):
        ap.error("the ratios are to the oracle's plan: keep oracle in --allocators")
    t_start = time.perf_counter()
    log = elapsed_log()

    model, tok, layout, group, calib_all = load_common(args)
    calib = calib_all[: args.calib]
    evals = windows_for(tok, args.eval_years, args.eval_windows, args.seq_len, "back")
    rows_by_label = [b for b in budgets(layout.num_layers) if b[0] in {x.strip() for x in args.labels.split(";")}]
    lieq = score_variants(model, calib, log, ("qkv",))["qkv/random_proj"]
    qerr, others = score_qerror_variants(model, calib, group, sorted({w for _, w, _ in rows_by_label}), log)
    dppl = delta_ppl(model, calib, progress=False)
    ref = reference_logprobs(model, evals, progress=False)
    float_nll = [-lp[:-1].gather(-1, w[1:, None]).mean().item() for lp, w in zip(ref, evals)]
    log(f"evaluation {tuple(evals.shape)} from {args.eval_years}; float PPL {math.exp(sum(float_nll) / len(float_nll)):.3f}")
    layer_params = [l.params for l in layout.layers]
    result = {"model": args.model, "group_size": group,
              "calibration": {"years": args.calib_years, "windows": list(calib_all.shape),
                              "scoring_windows": list(calib.shape)},
              "evaluation": {"years": args.eval_years, "windows": list(evals.shape)},
              "float_window_nll": float_nll, "rows": [], "torch_threads": torch.get_num_threads()}
    allocators = set(args.allocators.split(","))
    for method in args.methods.split(","):
        for label, widths, budget in rows_by_label:
            for allocator, seed, bits in plans(widths, budget, layer_params, lieq, qerr, others, dppl, allocators,
                                               args.seeds):
                plan = BitPlan(bits, group, method=method)
                qw = quantize_model(model, plan, calib=calib_all[: args.gptq_calib], progress=False)
                m = compare(fake_quantize(model, qw), ref, evals, progress=False)
                result["rows"].append({"method": method, "label": label, "allocator": allocator, "seed": seed,
                                       "bits": list(bits), "ppl": m["ppl"], "window_nll": m["window_nll"]})
                log(f"{method} {label} {allocator} {'' if seed is None else seed} PPL {m['ppl']:.3f}")
                result["total_s"] = time.perf_counter() - t_start
                atomic_write_text(out / f"{args.name}.json", json.dumps({**result, "partial": True}, indent=2) + "\n")
    return write(out, args.name, {**result, "partial": False}, args.boot)


def ratios(rows, n_boot: int, last: int = QUALITY_WINDOWS) -> list[dict]:
    """Each row's PPL ratio to the oracle row of its (method, label): on all windows with a
    paired bootstrap 95 % interval, and on the last `last` windows (quality.py's)."""
    oracle = {(r["method"], r["label"]): torch.tensor(r["window_nll"], dtype=torch.float64)
              for r in rows if r["allocator"] == "oracle"}
    out = []
    for r in rows:
        if r["allocator"] == "oracle":
            continue
        diff = torch.tensor(r["window_nll"], dtype=torch.float64) - oracle[(r["method"], r["label"])]
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, len(diff), (n_boot, len(diff)), generator=g)
        boot = diff[idx].mean(1).exp()
        lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out.append({**{k: r[k] for k in ("method", "label", "allocator", "seed", "ppl")},
                    "ratio": diff.mean().exp().item(), "ci95": [lo, hi],
                    "ratio_last": diff[-last:].mean().exp().item()})
    return out


def write(out: Path, name: str, res: dict, n_boot: int) -> int:
    res["ratios"] = ratios(res["rows"], n_boot)
    res["bootstrap_resamples"] = n_boot
    print(write_results(out, name, res, markdown, plot))
    return 0


def markdown(res) -> str:
    n = res["evaluation"]["windows"]
    oracle = {(r["method"], r["label"]): r["ppl"] for r in res["rows"] if r["allocator"] == "oracle"}
    lines = [f"# Precision of the allocator comparison: {res['model']}", "",
             f"Evaluation: the last {n[0]} x {n[1]} tokens of SOTU {res['evaluation']['years']} (quality.py's "
             f"{QUALITY_WINDOWS} windows are the last {QUALITY_WINDOWS} of them). PPL ratio to the ΔPPL oracle's plan "
             f"at the same budget and base quantizer, paired bootstrap over windows ({res['bootstrap_resamples']} "
             f"resamples; windows are consecutive speeches, so neighbours are not independent and the "
             f"intervals are if anything too narrow).", "",
             f"| method | budget | allocator | PPL | oracle PPL | vs oracle | 95 % interval | on the last {QUALITY_WINDOWS} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["ratios"]:
        name = r["allocator"] + ("" if r["seed"] is None else f" (seed {r['seed']})")
        lo, hi = r["ci95"]
        lines.append(f"| {r['method']} | {r['label']} | {name} | {r['ppl']:.3f} | {oracle[(r['method'], r['label'])]:.3f} | "
                     f"{r['ratio'] - 1:+.2%} | [{lo - 1:+.2%}, {hi - 1:+.2%}] | {r['ratio_last'] - 1:+.2%} |")
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["method"], r["label"]) for r in res["ratios"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.5), squeeze=False, sharey=True)
    names = ["lieq", "qerror", *QERROR_OTHERS, "random"]
    for ax, (method, label) in zip(axes[0], groups):
        rs = [r for r in res["ratios"] if (r["method"], r["label"]) == (method, label)]
        for i, r in enumerate(rs):
            lo, hi = r["ci95"]
            y = 100 * (r["ratio"] - 1)
            ax.errorbar(i, y, yerr=[[y - 100 * (lo - 1)], [100 * (hi - 1) - y]], marker="o", capsize=4,
                        color=f"C{names.index(r['allocator'])}")
            ax.scatter(i, 100 * (r["ratio_last"] - 1), marker="x", color="k", zorder=3)
        ax.axhline(5, color="r", ls=":", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(rs)), [r["allocator"] + ("" if r["seed"] is None else f" {r['seed']}") for r in rs],
                      rotation=60, fontsize=8)
        ax.set_title(f"{method} {label}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"PPL vs ΔPPL oracle (%), 95 % interval; x: last {QUALITY_WINDOWS} windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
