"""Quality of LieQ allocations against baselines on a real model.

Calibration on State of the Union addresses from one range of years, evaluation on a
disjoint range (512-token windows). For every budget: the LieQ plan, the qerror plan
(measured at that budget's widths; `qerror_local` and `qerror_final` are its other
normalizations, `qerror_measured` / `qerror_extrapolated` its non-default treatment of the
widest width, kept for comparison), random plans (several seeds), the reversed ranking
and the ΔPPL oracle, each quantized with the base quantizer(s) and compared with the float
model (perplexity, KL, top-1). The defaults these rows rely on were chosen on other years
(choices.py), so the evaluation years stay held out.

    python benchmarks/quality.py                 # RTN, smollm2-135m
    python benchmarks/quality.py --methods rtn,gptq

Writes benchmarks/results/quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lieq_export.allocate import allocate, baseline_scores, uniform_bits  # noqa: E402
from lieq_export.evaluate import compare, perplexity, reference_logprobs  # noqa: E402
from lieq_export.io import atomic_write_text  # noqa: E402
from lieq_export.models import describe, load_model  # noqa: E402
from lieq_export.plan import BitPlan, default_group_size  # noqa: E402
from lieq_export.qerror import QErrorConfig, damage_table, score_qerror  # noqa: E402
from lieq_export.quantize import fake_quantize, quantize_model  # noqa: E402
from lieq_export.scoring import ALL_PROJECTIONS, QKV, ScoreConfig, delta_ppl, score_layers, spearman  # noqa: E402
from lieq_export.text import load_text, split_windows, token_windows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# qerror's non-default settings, as QErrorConfig overrides (the defaults get the plain "qerror" rows)
QERROR_OTHERS = {
    "qerror_local": {"normalize": "local"},
    "qerror_final": {"normalize": "final"},
    **({"qerror_extrapolated": {"measure_widest": False}} if QErrorConfig.measure_widest
       else {"qerror_measured": {"measure_widest": True}}),
}
ALLOCATORS = ("lieq", "qerror", *QERROR_OTHERS, "random", "reversed", "oracle")
GAP_COLUMNS = ("lieq", "qerror", *QERROR_OTHERS)


def budgets(n_layers: int):
    """(label, widths, budget) of the LieQ rows."""
    # The rows that decide between allocators at useful quality come first, so a run cut
    # short still has them.
    return [
        ("{3,4} 3.2", (3, 4), 3.2),
        ("{3,4} 3.5", (3, 4), 3.5),
        ("{4,8} 4.5", (4, 8), 4.5),
        ("{2,4} 3.0", (2, 4), 3.0),
        ("{2,3,4} 3.0", (2, 3, 4), 3.0),
        ("{2,4} one 4-bit layer", (2, 4), 2 + 2 / n_layers),
    ]


def windows_for(tok, years: str, n: int, seq_len: int, take: str) -> torch.Tensor:
    from sotu import year_range_folder

    first, last = (int(y) for y in years.split("-"))
    w = token_windows(tok, load_text(str(year_range_folder(first, last))), seq_len)
    calib, ev = split_windows(w, n if take == "front" else 0, n if take == "back" else 0)
    return calib if take == "front" else ev


def score_variants(model, calib, log, sets=("qkv", "all")):
    """Δr (and top-k energy gain) for each baseline and projection set, with their cost."""
    out = {}
    for projs, pname in ((QKV, "qkv"), (ALL_PROJECTIONS, "all")):
        if pname not in sets:
            continue
        for baseline in ("random_proj", "random_model"):
            cfg = ScoreConfig(projections=projs, baseline=baseline)
            s = score_layers(model, calib, cfg)
            out[f"{pname}/{baseline}"] = s
            log(f"scored {pname}/{baseline} in {s['seconds']:.1f} s")
    return out


def score_qerror_variants(model, calib, group: int, width_sets, log):
    """qerror with its defaults and with each of QERROR_OTHERS, per width set (it measures only
    the widths a plan may use): ({widths: scores}, {name: {widths: scores}})."""
    qerr, others = {}, {name: {} for name in QERROR_OTHERS}
    for widths in width_sets:
        qerr[widths] = score_qerror(model, calib, QErrorConfig(widths=widths, group_size=group), progress=False)
        for name, overrides in QERROR_OTHERS.items():
            others[name][widths] = score_qerror(
                model, calib, QErrorConfig(widths=widths, group_size=group, **overrides), progress=False)
        log(f"scored qerror {widths} in {qerr[widths]['seconds']:.1f} s")
    return qerr, others


def plans(widths, budget, layer_params, lieq, qerr, others, dppl, allocators, seeds: int):
    """(allocator, seed, bits) of each requested allocator's plan at one budget."""
    rankings = {"lieq": lieq["scores"], "reversed": baseline_scores("reversed", lieq["scores"]),
                "oracle": dppl["scores"]}
    for name, vec in rankings.items():
        if name in allocators:
            yield name, None, allocate(vec, layer_params, widths, budget)
    for name, q in (("qerror", qerr[widths]), *((n, o[widths]) for n, o in others.items())):
        if name in allocators:
            yield name, None, allocate(q["scores"], layer_params, widths, budget, damage=damage_table(q, widths))
    for seed in range(seeds if "random" in allocators else 0):
        vec = baseline_scores("random", n_layers=len(layer_params), seed=seed)
        yield "random", seed, allocate(vec, layer_params, widths, budget)


def add_common_args(ap: argparse.ArgumentParser, gptq_calib: int) -> None:
    """Model, calibration, threads and output: shared with choices.py, whose choices only
    carry over if it calibrates as this benchmark does."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-years", default="1934-1970")
    ap.add_argument("--calib", type=int, default=4, help="scoring / ΔPPL windows (default 4 x 512 tokens)")
    ap.add_argument("--gptq-calib", type=int, default=gptq_calib, help="GPTQ calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a shared machine)")
    ap.add_argument("--out", default=str(RESULTS))


def load_common(args):
    """(model, tokenizer, layout, group size, calibration windows) as add_common_args describes them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    layout = describe(model)
    calib = windows_for(tok, args.calib_years, max(args.calib, args.gptq_calib), args.seq_len, "front")
    return model, tok, layout, default_group_size(layout), calib


def write_results(out_dir: Path, name: str, result: dict, markdown, plot=None) -> str:
    """NAME.json and NAME.md (and NAME.png with `plot`) under out_dir, each replaced whole;
    returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    atomic_write_text(out_dir / f"{name}.md", md)
    if plot is not None:
        plot(result, out_dir / f"{name}.png")
    return md


def elapsed_log():
    """print() with the seconds since this call in front."""
    t_start = time.perf_counter()
    return lambda m: print(f"[{time.perf_counter() - t_start:7.1f}s] {m}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, gptq_calib=16)
    ap.add_argument("--eval-years", default="1990-2021")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--methods", default="rtn", help="comma-separated base quantizers: rtn, gptq")
    ap.add_argument("--seeds", type=int, default=3, help="random allocations per budget")
    ap.add_argument("--projection-sets", default="qkv,all", help="LieQ variants to score: qkv, all")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS),
                    help="which allocators get rows")
    ap.add_argument("--labels", default=None, help="only these budget rows (';'-separated labels, e.g. '{3,4} 3.2;{3,4} 3.5')")
    ap.add_argument("--uniform", default="2,3,4,8", help="uniform widths to run")
    ap.add_argument("--name", default="quality")
    ap.add_argument("--merge", default=None, help="combine the rows of finished runs (comma-separated JSON files, "
                    "e.g. one per --methods run in parallel) into --name; scores and costs come from the first")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([Path(p) for p in args.merge.split(",")], Path(args.out), args.name)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = elapsed_log()

    model, tok, layout, group, calib_all = load_common(args)
    calib = calib_all[: args.calib]
    evals = windows_for(tok, args.eval_years, args.eval_windows, args.seq_len, "back")
    log(f"{layout.architecture}, {layout.num_layers} layers, group {group}; calibration {tuple(calib_all.shape)} "
        f"from {args.calib_years}, evaluation {tuple(evals.shape)} from {args.eval_years}")

    variants = score_variants(model, calib, log, args.projection_sets.split(","))
    lieq = variants["qkv/random_proj"]
    qerr, others = score_qerror_variants(model, calib, group, sorted({w for _, w, _ in budgets(layout.num_layers)}), log)
    qerr_all = score_qerror(model, calib, QErrorConfig(widths=(2, 3, 4, 8), group_size=group), progress=False)
    dppl = delta_ppl(model, calib)
    log(f"ΔPPL probing ({layout.num_layers + 1} passes) in {dppl['seconds']:.1f} s")
    rho = {name: spearman(s["scores"], dppl["scores"]) for name, s in variants.items()}
    rho["qerror (damage at 2 bits)"] = spearman(qerr_all["scores"], dppl["scores"])
    rho.update({f"{name} (energy gain)": spearman([l["energy_gain"] for l in s["layers"]], dppl["scores"])
                for name, s in variants.items()})
    for k, v in rho.items():
        log(f"ρ({k}, ΔPPL) = {v:+.3f}")

    ref = reference_logprobs(model, evals)
    float_ppl = perplexity(model, evals)
    log(f"float PPL {float_ppl:.3f}")

    layer_params = [l.params for l in layout.layers]
    rows = []

    def save(partial: bool):
        result = {
            "model": args.model, "architecture": layout.architecture, "group_size": group, "partial": partial,
            "calibration": {"years": args.calib_years, "windows": list(calib_all.shape),
                            "scoring_windows": list(calib.shape)},
            "evaluation": {"years": args.eval_years, "windows": list(evals.shape)},
            "float_ppl": float_ppl,
            "scores": {k: {"scores": v["scores"], "energy_gain": [l["energy_gain"] for l in v["layers"]],
                           "seconds": v["seconds"]} for k, v in variants.items()},
            "qerror": {",".join(map(str, w)): {k: q[k] for k in ("scores", "damage", "seconds", "config")}
                       for w, q in [*qerr.items(), ((2, 3, 4, 8), qerr_all)]},
            **{name: {",".join(map(str, w)): {k: q[k] for k in ("scores", "damage", "seconds", "config")}
                      for w, q in by_widths.items()} for name, by_widths in others.items()},
            "delta_ppl": dppl,
            "spearman_vs_delta_ppl": rho,
            # qerror's cost quoted at the {3,4} width set (the budgets of the accuracy target)
            "cost": {"lieq_score_s": lieq["seconds"], "qerror_score_s": qerr[(3, 4)]["seconds"],
                     "qerror_score_s_by_widths": {",".join(map(str, w)): q["seconds"] for w, q in qerr.items()},
                     **{f"{name}_score_s": o[(3, 4)]["seconds"] for name, o in others.items()},
                     "qerror_measure_widest": QErrorConfig.measure_widest,
                     "delta_ppl_s": dppl["seconds"],
                     "delta_ppl_over_score": dppl["seconds"] / lieq["seconds"],
                     "qerror_over_lieq": qerr[(3, 4)]["seconds"] / lieq["seconds"],
                     "delta_ppl_over_qerror": dppl["seconds"] / qerr[(3, 4)]["seconds"]},
            "rows": rows,
            "torch_threads": torch.get_num_threads(),
            "total_s": time.perf_counter() - t_start,
        }
        # the plot only once the run is whole
        return write_results(out_dir, args.name, result, markdown, None if partial else plot)

    def run(method, label, widths, budget, allocator, bits, seed=None):
        plan = BitPlan(bits, group, method=method, allocator=allocator, budget=budget)
        t0 = time.perf_counter()
        qw = quantize_model(model, plan, calib=calib_all[: args.gptq_calib], progress=False)
        t_q = time.perf_counter() - t0
        m = compare(fake_quantize(model, qw), ref, evals, progress=False)
        acc = plan.accounting(layout)
        row = {"method": method, "label": label, "widths": list(widths), "budget": budget, "allocator": allocator,
               "seed": seed, "bits": list(bits), "avg_grid_bits": acc["avg_grid_bits"],
               "storage_bits": acc["storage_bits"], "predicted_bytes": acc["predicted_bytes"],
               "quantize_s": t_q, **m}
        rows.append(row)
        save(partial=True)
        log(f"{method} {label:<22} {allocator:<9} {'' if seed is None else seed:>2} bits {acc['avg_grid_bits']:.3f} "
            f"PPL {m['ppl']:8.3f} KL {m['kl']:.4f} top1 {m['top1']:.4f}")

    allocators = set(args.allocators.split(","))
    labels = None if args.labels is None else {x.strip() for x in args.labels.split(";")}
    for method in args.methods.split(","):
        for b in (int(x) for x in args.uniform.split(",") if x):
            run(method, f"uniform {b}", (b,), float(b), "uniform", uniform_bits(layout.num_layers, (b,), b))
        for label, widths, budget in budgets(layout.num_layers):
            if labels is not None and label not in labels:
                continue
            for allocator, seed, bits in plans(widths, budget, layer_params, lieq, qerr, others, dppl, allocators,
                                               args.seeds):
                run(method, label, widths, budget, allocator, bits, seed)

    print(save(partial=False))
    return 0


def merge(paths, out_dir: Path, name: str) -> int:
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]
    for p, r in zip(paths, runs):
        if r.get("partial"):
            raise SystemExit(f"{p} is a partial run; finish it before merging")
    for p, r in zip(paths[1:], runs[1:]):
        # The runs must share model, texts and (deterministic) scores, or their rows do not compare.
        for key in ("model", "group_size", "calibration", "evaluation", "float_ppl"):
            if r[key] != first[key]:
                raise SystemExit(f"{p} differs from {paths[0]} in {key}: {r[key]!r} vs {first[key]!r}; cannot merge")
        if r["delta_ppl"]["scores"] != first["delta_ppl"]["scores"] or r["qerror"].keys() != first["qerror"].keys() or any(
                r["qerror"][k]["scores"] != first["qerror"][k]["scores"] for k in r["qerror"]):
            raise SystemExit(f"{p} has other scores than {paths[0]}; cannot merge")
    result = {**first, "rows": [row for r in runs for row in r["rows"]], "merged_from": [p.name for p in paths],
              "total_s": max(r["total_s"] for r in runs)}
    print(write_results(out_dir, name, result, markdown, plot))
    return 0


def summarize(rows):
    """Random rows collapse into mean ± sd per (method, label)."""
    out, groups = [], {}
    for r in rows:
        if r["allocator"] == "random":
            groups.setdefault((r["method"], r["label"]), []).append(r)
        else:
            out.append({**r, "ppl_sd": None})
    for (method, label), rs in groups.items():
        mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        sd = statistics.stdev(r["ppl"] for r in rs) if len(rs) > 1 else 0.0
        out.append({**rs[0], "allocator": f"random (n={len(rs)})", "ppl": mean("ppl"), "ppl_sd": sd,
                    "kl": mean("kl"), "top1": mean("top1"), "avg_grid_bits": mean("avg_grid_bits")})
    order = {a: i for i, a in enumerate(("uniform", *ALLOCATORS))}
    return sorted(out, key=lambda r: (r["method"], r["budget"], r["label"], order.get(r["allocator"].split()[0], 9)))


def markdown(res) -> str:
    lines = [
        f"# Quality: {res['model']} ({res['architecture']}), group {res['group_size']}",
        "",
        *(["**Partial: the run was interrupted; only the rows below were measured.**", ""] if res.get("partial") else []),
        f"Calibration: SOTU {res['calibration']['years']} ({res['calibration']['scoring_windows'][0]} x "
        f"{res['calibration']['scoring_windows'][1]} tokens for scoring and ΔPPL); evaluation: SOTU "
        f"{res['evaluation']['years']} ({res['evaluation']['windows'][0]} x {res['evaluation']['windows'][1]} tokens). "
        f"Float PPL {res['float_ppl']:.3f}. Embeddings and lm_head at 8 bits (not counted in the averages).",
        "",
        "| method | budget | allocator | avg grid bits | pte bits | onnx bits | PPL | KL | top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summarize(res["rows"]):
        ppl = f"{r['ppl']:.3f}" + (f" ± {r['ppl_sd']:.3f}" if r.get("ppl_sd") is not None else "")
        lines.append(f"| {r['method']} | {r['label']} | {r['allocator']} | {r['avg_grid_bits']:.3f} | "
                     f"{r['storage_bits']['pte']:.2f} | {r['storage_bits']['onnx']:.2f} | {ppl} | {r['kl']:.4f} | "
                     f"{r['top1']:.4f} |")
    c = res["cost"]
    lines += ["", f"Scoring (qkv, random_proj) {c['lieq_score_s']:.1f} s; ΔPPL probing {c['delta_ppl_s']:.1f} s on the "
              f"same tokens: {c['delta_ppl_over_score']:.1f}x the scoring time.",
              f"qerror scoring at widths {{3,4}} {c.get('qerror_score_s', float('nan')):.1f} s: "
              f"{c.get('qerror_over_lieq', float('nan')):.2f}x the LieQ proxy, "
              f"1/{c.get('delta_ppl_over_qerror', float('nan')):.1f} of ΔPPL probing"
              + "".join(f"; {name} {c[f'{name}_score_s']:.1f} s, 1/{c['delta_ppl_s'] / c[f'{name}_score_s']:.1f}"
                        for name in ("qerror_measured", "qerror_extrapolated") if f"{name}_score_s" in c) + ".", "",
              "| score | Spearman ρ with ΔPPL |", "|---|---|"]
    lines += [f"| {k} | {v:+.3f} |" for k, v in res["spearman_vs_delta_ppl"].items()]
    gaps = oracle_gaps(res["rows"])
    if gaps:
        lines += ["", "PPL relative to the ΔPPL oracle's plan at the same budget and base quantizer:", "",
                  f"| method | budget | {' | '.join(GAP_COLUMNS)} |", "|---|---|" + "---|" * len(GAP_COLUMNS)]
        for (method, label), g in gaps.items():
            cells = " | ".join(f"{g[a]:+.2%}" if a in g else "-" for a in GAP_COLUMNS)
            lines.append(f"| {method} | {label} | {cells} |")
    return "\n".join(lines) + "\n"


def oracle_gaps(rows) -> dict:
    """{(method, label): {allocator: PPL / oracle PPL - 1}} for the budgets with an oracle row."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["label"]), {})[r["allocator"]] = r["ppl"]
    return {k: {a: v[a] / v["oracle"] - 1 for a in GAP_COLUMNS if a in v}
            for k, v in by.items() if "oracle" in v}


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(res["rows"])
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(7 * len(methods), 5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, alloc in enumerate(("uniform", *ALLOCATORS)):
            pts = sorted((r["avg_grid_bits"], r["ppl"], r.get("ppl_sd") or 0) for r in rows
                         if r["method"] == method and r["allocator"].split()[0] == alloc)
            if pts:
                x, y, e = zip(*pts)
                # one colour per allocator in every panel
                ax.errorbar(x, y, yerr=e if alloc == "random" else None, marker="o", label=alloc, capsize=3,
                            color=f"C{i}")
        ax.axhline(res["float_ppl"], color="k", ls="--", lw=1, label="float")
        ax.set_yscale("log")
        ax.set_xlabel("average grid bits (decoder linears)")
        ax.set_ylabel("perplexity (held-out SOTU)")
        ax.set_title(f"{res['model']} — {method}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
