"""Design choices measured on validation text, so that quality.py's evaluation stays held out.

quality.py calibrates on SOTU 1934-1970 and reports on SOTU 1990-2021. The defaults it
then relies on are chosen here, on SOTU 1971-1989, disjoint from both:

1. GPTQ at 8 bits (one group per row): act-order or natural column order, against RTN.
2. qerror: normalization ("reader", "local", "final") and error_tokens (512, 1024, 2048), by the
   perplexity of the plans they give at {3,4} 3.2 / 3.5 and {2,3,4} 3.0, beside the ΔPPL
   oracle's plans: every plan with RTN, the plans at the default 1024 tokens also with GPTQ
   (the default quantizer of `run`). The default normalization is the one with the smallest
   mean gap to the oracle at the target budgets (3.2, 3.5) with GPTQ.
3. qerror's widest width: measured, or extrapolated from the next narrower one (one layer
   pass fewer: a third of the cost at two widths), with the default normalization and
   error tokens, RTN and GPTQ. Rule, stated before the run: extrapolation becomes the
   default only if every gap to the oracle at {3,4} 3.2 and 3.5, with RTN and with GPTQ,
   stays within +5 % (the issue's target, which measuring every width meets here), since it
   is what brings the scorer under 1/20 of ΔPPL probing's cost.

    python benchmarks/choices.py
    python benchmarks/choices.py --sections widest --name choices_widest   # one section

Writes benchmarks/results/choices.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import add_common_args, elapsed_log, load_common, windows_for, write_results  # noqa: E402

from lieq_export.allocate import allocate, uniform_bits  # noqa: E402
from lieq_export.evaluate import compare, perplexity, reference_logprobs  # noqa: E402
from lieq_export.gptq import gptq_quantize_model  # noqa: E402
from lieq_export.plan import BitPlan  # noqa: E402
from lieq_export.qerror import NORMALIZE, QErrorConfig, damage_table, score_qerror  # noqa: E402
from lieq_export.quantize import fake_quantize, quantize_model  # noqa: E402
from lieq_export.scoring import delta_ppl  # noqa: E402

BUDGETS = (((3, 4), 3.2), ((3, 4), 3.5), ((2, 3, 4), 3.0))
SECTIONS = ("gptq8", "qerror", "widest")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, gptq_calib=8)  # 8: as quality.py's last run
    ap.add_argument("--val-years", default="1971-1989")
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which choices to measure: {', '.join(SECTIONS)}")
    ap.add_argument("--name", default="choices")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    if bad := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(bad)}; use {', '.join(SECTIONS)}")
    t_start = time.perf_counter()
    log = elapsed_log()

    model, tok, layout, group, calib = load_common(args)
    val = windows_for(tok, args.val_years, args.val_windows, args.seq_len, "back")
    ref = reference_logprobs(model, val, progress=False)
    float_ppl = perplexity(model, val, progress=False)
    log(f"validation {tuple(val.shape)} from {args.val_years}; float PPL {float_ppl:.3f}")
    layer_params = [l.params for l in layout.layers]

    def evaluate(qw) -> dict:
        return compare(fake_quantize(model, qw), ref, val, progress=False)

    def gptq(bits) -> dict:
        plan = BitPlan(bits, group, method="gptq")
        return gptq_quantize_model(model, plan, calib[: args.gptq_calib], progress=False)

    gptq8 = []
    eight = BitPlan(uniform_bits(layout.num_layers, (8,), 8), group, method="gptq")
    for name, qw in () if "gptq8" not in sections else (
        ("rtn", lambda: quantize_model(model, BitPlan(eight.layer_bits, group), progress=False)),
        ("gptq, natural order", lambda: gptq_quantize_model(model, eight, calib[: args.gptq_calib], progress=False)),
        ("gptq, act-order", lambda: gptq_quantize_model(model, eight, calib[: args.gptq_calib], progress=False,
                                                        per_channel_act_order=True)),
    ):
        gptq8.append({"variant": name, **evaluate(qw())})
        log(f"8-bit {name}: {gptq8[-1]}")

    dppl = delta_ppl(model, calib[: args.calib], progress=False)
    log(f"ΔPPL probing in {dppl['seconds']:.1f} s")
    qerror, seen, seen_gptq = [], {}, {}
    for widths, budget in BUDGETS if "qerror" in sections else ():
        candidates = [("oracle", None, None, allocate(dppl["scores"], layer_params, widths, budget))]
        for tokens in (512, 1024, 2048):
            for normalize in NORMALIZE:
                s = score_qerror(model, calib[: args.calib], QErrorConfig(widths=widths, group_size=group,
                                 error_tokens=tokens, normalize=normalize), progress=False)
                bits = allocate(s["scores"], layer_params, widths, budget, damage=damage_table(s, widths))
                candidates.append((normalize, tokens, s["seconds"], bits))
        for normalize, tokens, seconds, bits in candidates:
            key = (widths, budget, bits)
            if key not in seen:
                seen[key] = evaluate(quantize_model(model, BitPlan(bits, group), progress=False))
            if tokens in (None, 1024) and key not in seen_gptq:
                seen_gptq[key] = evaluate(gptq(bits))
            qerror.append({"widths": list(widths), "budget": budget, "normalize": normalize, "error_tokens": tokens,
                           "score_s": seconds, "bits": list(bits), **seen[key],
                           "gptq": seen_gptq.get(key) if tokens in (None, 1024) else None})
            log(f"{widths} {budget} {normalize} {tokens}: {''.join(map(str, bits))} PPL {seen[key]['ppl']:.3f}"
                + (f" GPTQ {seen_gptq[key]['ppl']:.3f}" if tokens in (None, 1024) else ""))

    widest = []
    for widths, budget in BUDGETS if "widest" in sections else ():
        plans = [("oracle", None, allocate(dppl["scores"], layer_params, widths, budget))]
        for measure in (True, False):
            s = score_qerror(model, calib[: args.calib], QErrorConfig(widths=widths, group_size=group,
                             measure_widest=measure), progress=False)
            plans.append(("measured" if measure else "extrapolated", s["seconds"],
                          allocate(s["scores"], layer_params, widths, budget, damage=damage_table(s, widths))))
        for variant, seconds, bits in plans:
            key = (widths, budget, bits)
            if key not in seen:
                seen[key] = evaluate(quantize_model(model, BitPlan(bits, group), progress=False))
            if key not in seen_gptq:
                seen_gptq[key] = evaluate(gptq(bits))
            widest.append({"widths": list(widths), "budget": budget, "variant": variant, "score_s": seconds,
                           "bits": list(bits), **seen[key], "gptq": seen_gptq[key]})
            log(f"{widths} {budget} widest {variant}: {''.join(map(str, bits))} PPL {seen[key]['ppl']:.3f} "
                f"GPTQ {seen_gptq[key]['ppl']:.3f}")

    result = {"model": args.model, "calibration_years": args.calib_years, "validation_years": args.val_years,
              "validation_windows": list(val.shape), "float_ppl": float_ppl, "gptq_calib_windows": args.gptq_calib,
              "sections": sections, "gptq_8bit": gptq8, "qerror": qerror, "widest": widest,
              "delta_ppl_s": dppl["seconds"], "torch_threads": torch.get_num_threads(),
              "total_s": time.perf_counter() - t_start}
    print(write_results(Path(args.out), args.name, result, markdown, plot))
    return 0


def _oracle_ppl(res, widths, budget, method="rtn", section="qerror") -> float:
    key = "normalize" if section == "qerror" else "variant"
    r = next(r for r in res[section] if r[key] == "oracle" and r["widths"] == widths and r["budget"] == budget)
    return r["ppl"] if method == "rtn" else r["gptq"]["ppl"]


def _gap(res, r, method, section="qerror") -> float:
    ppl = r["ppl"] if method == "rtn" else r["gptq"]["ppl"]
    return ppl / _oracle_ppl(res, r["widths"], r["budget"], method, section) - 1


def target_gaps(res, method: str) -> dict:
    """Mean PPL gap to the oracle at the target budgets {3,4} 3.2 and 3.5, per normalization (1024 tokens)."""
    gaps = {}
    for r in res["qerror"]:
        if r["normalize"] != "oracle" and r["error_tokens"] == 1024 and r["widths"] == [3, 4]:
            gaps.setdefault(r["normalize"], []).append(_gap(res, r, method))
    return {k: sum(v) / len(v) for k, v in gaps.items()}


def widest_verdict(res) -> dict:
    """Section 3's rule: {variant: every {3,4} gap within +5 % with RTN and GPTQ}, and the gaps."""
    out = {}
    for r in res["widest"]:
        if r["variant"] != "oracle" and r["widths"] == [3, 4]:
            v = out.setdefault(r["variant"], {"gaps": {}, "within_5pct": True})
            for method in ("rtn", "gptq"):
                g = _gap(res, r, method, "widest")
                v["gaps"][f"{method} {r['budget']}"] = g
                v["within_5pct"] &= g <= 0.05
    return out


def markdown(res) -> str:
    lines = [f"# Design choices on validation text: {res['model']}", "",
             f"Validation: SOTU {res['validation_years']} ({res['validation_windows'][0]} x "
             f"{res['validation_windows'][1]} tokens), disjoint from calibration ({res['calibration_years']}) and from "
             f"quality.py's evaluation years. Float PPL {res['float_ppl']:.3f}."]
    if res.get("gptq_8bit"):
        lines += ["", f"## 8-bit: GPTQ column order ({res['gptq_calib_windows']} calibration windows)", "",
                  "| variant | PPL | KL | top-1 |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['ppl']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} |" for r in res["gptq_8bit"]]
    if res.get("qerror"):
        lines += ["", "## qerror: normalization and error tokens (RTN plans)", "",
                  "| widths | budget | scorer | error tokens | score s | plan | RTN PPL | vs oracle | GPTQ PPL | vs oracle |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["qerror"]:
            g = "- | -" if not r.get("gptq") else f"{r['gptq']['ppl']:.3f} | {_gap(res, r, 'gptq'):+.2%}"
            lines.append(f"| {{{','.join(map(str, r['widths']))}}} | {r['budget']} | {r['normalize']} | "
                         f"{r['error_tokens'] or '-'} | {'-' if r['score_s'] is None else format(r['score_s'], '.1f')} | "
                         f"{''.join(map(str, r['bits']))} | {r['ppl']:.3f} | {_gap(res, r, 'rtn'):+.2%} | {g} |")
        lines += ["", "Mean gap to the oracle at {3,4} 3.2 and 3.5 (1024 error tokens):", "",
                  "| normalization | RTN | GPTQ |", "|---|---|---|"]
        rtn, gq = target_gaps(res, "rtn"), target_gaps(res, "gptq")
        lines += [f"| {k} | {rtn[k]:+.2%} | {gq[k]:+.2%} |" for k in rtn]
    if res.get("widest"):
        lines += ["", "## qerror: widest width measured or extrapolated (default normalization, 1024 tokens)", "",
                  "| widths | budget | widest | score s | plan | RTN PPL | vs oracle | GPTQ PPL | vs oracle |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["widest"]:
            lines.append(f"| {{{','.join(map(str, r['widths']))}}} | {r['budget']} | {r['variant']} | "
                         f"{'-' if r['score_s'] is None else format(r['score_s'], '.1f')} | {''.join(map(str, r['bits']))} | "
                         f"{r['ppl']:.3f} | {_gap(res, r, 'rtn', 'widest'):+.2%} | {r['gptq']['ppl']:.3f} | "
                         f"{_gap(res, r, 'gptq', 'widest'):+.2%} |")
        lines += ["", "Rule (stated before the run): extrapolation becomes the default only if all four {3,4} gaps "
                  "(RTN, GPTQ at 3.2 and 3.5) are within +5 %.", ""]
        for variant, v in widest_verdict(res).items():
            gaps = ", ".join(f"{k} {g:+.2%}" for k, g in v["gaps"].items())
            lines.append(f"- {variant}: {gaps} → {'all within' if v['within_5pct'] else 'not all within'} +5 %")
    lines += ["", f"ΔPPL probing: {res['delta_ppl_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("gptq_8bit", "qerror", "widest") if res.get(k)]
    widths = {"gptq_8bit": 1, "qerror": 3, "widest": 1.5}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * sum(widths[p] for p in panels), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [widths[p] for p in panels]})
    for ax, panel in zip(axes[0], panels):
        if panel == "gptq_8bit":
            ax.bar([r["variant"] for r in res["gptq_8bit"]], [r["ppl"] for r in res["gptq_8bit"]], color="tab:blue")
            ax.axhline(res["float_ppl"], color="k", ls="--", lw=1, label="float")
            lo = min(r["ppl"] for r in res["gptq_8bit"] + [{"ppl": res["float_ppl"]}])
            ax.set_ylim(lo * 0.995, max(r["ppl"] for r in res["gptq_8bit"]) * 1.003)
            ax.set_ylabel("validation PPL")
            ax.set_title("8-bit")
            ax.tick_params(axis="x", rotation=20)
            ax.legend()
            continue
        key = "normalize" if panel == "qerror" else "variant"
        rows = [r for r in res[panel] if r[key] != "oracle"]
        labels = [f"{{{','.join(map(str, r['widths']))}}} {r['budget']}\n{r[key]}"
                  + (f" {r['error_tokens']}" if panel == "qerror" else "") for r in rows]
        colors = {"reader": "tab:green", "local": "tab:blue", "final": "tab:orange", "measured": "tab:green",
                  "extrapolated": "tab:purple"}
        ax.bar(range(len(rows)), [100 * _gap(res, r, "rtn", panel) for r in rows], color=[colors[r[key]] for r in rows])
        pts = [(i, 100 * _gap(res, r, "gptq", panel)) for i, r in enumerate(rows) if r.get("gptq")]
        if pts:
            ax.scatter(*zip(*pts), color="k", marker="D", zorder=3, label="same plan, GPTQ")
        ax.axhline(5, color="r", ls=":", lw=1, label="+5 %")
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
        ax.set_yscale("symlog", linthresh=10)  # the target budgets' gaps are a few %, {2,3,4}'s up to 2600 %
        ax.set_ylabel("PPL vs ΔPPL oracle's plan (%)")
        ax.set_title("qerror plans (bars: RTN), validation text" if panel == "qerror" else "widest width")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
