"""report.html for a `lieq-export run` folder: why each layer got its bits, and what it cost.

Built from every budget run in the folder (runs/*.json), so the perplexity-against-bits
curve grows as budgets are added. The page sets its title to "images loaded: N/N" once
the browser has decoded every picture, which the render check reads.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .io import atomic_write_text

BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#2ca02c", 8: "#1f77b4"}


def load_runs(out: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return sorted(runs, key=lambda r: r["budget"])


def _plots(out: Path, runs: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pics = []
    latest = runs[-1]

    # 1. per-layer scores, coloured by the bits each budget gave the layer
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        vals, bits = r["scores"]["values"], r["plan"]["layer_bits"]
        ax.bar(range(len(vals)), vals, color=[BIT_COLORS.get(b, "gray") for b in bits])
        ax.set_yscale("log" if r["scores"]["scorer"] == "qerror" and min(vals) > 0 else "linear")
        ax.set_ylabel("damage @ lowest width" if r["scores"]["scorer"] == "qerror" else "Δr")
        ax.set_title(f"{r['budget']:g} bits: layer scores ({r['scores']['scorer']}), colour = bits")
        for b, c in BIT_COLORS.items():
            if b in bits:
                ax.bar([0], [0], color=c, label=f"{b}-bit")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)
    pics.append(("scores.png", "Per-layer scores with the chosen bits"))

    # 2. ΔPPL validation
    dppl = latest["scores"].get("delta_ppl")
    if dppl:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter(latest["scores"]["values"], dppl)
        for i, (x, y) in enumerate(zip(latest["scores"]["values"], dppl)):
            ax.annotate(str(i), (x, y), fontsize=7)
        ax.set_xlabel(f"score ({latest['scores']['scorer']})")
        ax.set_ylabel("ΔPPL (layer replaced by identity)")
        ax.set_xscale("log" if min(latest["scores"]["values"]) > 0 else "linear")
        ax.set_yscale("symlog")
        ax.set_title(f"Spearman ρ = {latest['scores']['spearman_delta_ppl']:.3f}")
        fig.tight_layout()
        fig.savefig(out / "delta_ppl.png", dpi=100)
        plt.close(fig)
        pics.append(("delta_ppl.png", "ΔPPL validation of the scores"))

    # 3. perplexity against effective bits
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["accounting"]["avg_grid_bits"] for r in runs]
    ax.plot(xs, [r["reference"]["reference_ppl"] for r in runs], "o-", label="PyTorch reference")
    for t in sorted({t for r in runs for t in r["targets"]}):
        pts = [(r["accounting"]["avg_grid_bits"], r["targets"][t]["ppl"]) for r in runs if t in r["targets"]]
        ax.plot(*zip(*pts), "s--", label=f"{t} bundle")
    ax.axhline(runs[0]["reference"]["float_ppl"], color="k", ls=":", label="float")
    ax.set_xlabel("average grid bits (decoder linears)")
    ax.set_ylabel("perplexity (held-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png", dpi=100)
    plt.close(fig)
    pics.append(("ppl_vs_bits.png", "Perplexity against effective bits"))

    # 4. file size and 5. speed per target, for every budget
    for key, fname, ylabel, title in (
        ("model_bytes", "sizes.png", "MB", "Model file size per target (hatched: predicted)"),
        ("tokens_per_s", "speed.png", "tokens/s", "Decode speed while verifying (this machine)"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        targets = sorted({t for r in runs for t in r["targets"]})
        width = 0.8 / max(1, len(targets))
        for j, t in enumerate(targets):
            pos = [i + j * width for i in range(len(runs))]
            vals = [r["targets"].get(t, {}).get(key, 0) / (1e6 if key == "model_bytes" else 1) for r in runs]
            ax.bar(pos, vals, width, label=t)
            if key == "model_bytes":
                pred = [(r["targets"].get(t, {}).get("predicted_bytes") or 0) / 1e6 for r in runs]
                ax.bar(pos, pred, width, fill=False, hatch="//", edgecolor="k")
        ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(runs))],
                      [f"{r['budget']:g} bits" for r in runs])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        pics.append((fname, title))
    return pics


def write_report(out) -> Path:
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        raise ValueError(f"{out} has no runs/*.json; run `lieq-export run` first")
    pics = _plots(out, runs)
    esc = html.escape
    rows = []
    for r in runs:
        for t, v in r["targets"].items():
            rows.append(
                f"<tr><td>{r['budget']:g}</td><td>{r['accounting']['avg_grid_bits']:.3f}</td><td>{esc(t)}</td>"
                f"<td>{r['accounting']['storage_bits'][t]:.2f}</td><td>{v['model_bytes'] / 1e6:.1f}</td>"
                f"<td>{(v['predicted_bytes'] or 0) / 1e6:.1f}</td><td>{r['reference']['reference_ppl']:.3f}</td>"
                f"<td>{v['ppl']:.3f}</td><td>{v['top1_vs_reference']:.4f}</td><td>{v['top1_vs_float']:.4f}</td>"
                f"<td>{v['tokens_per_s']:.1f}</td><td><code>{esc(Path(v['bundle']).name)}</code></td></tr>")
    latest = runs[-1]
    cfg = latest["config"]
    bits = " ".join(str(b) for b in latest["plan"]["layer_bits"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lieq-export report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} img{{max-width:100%;display:block;margin:1em 0}}</style>
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `images loaded: ${{ok}}/${{imgs.length}}`;
}});
</script></head><body>
<h1>lieq-export: {esc(cfg['model'])}</h1>
<p>Scorer <b>{esc(latest['scores']['scorer'])}</b>, base quantizer <b>{esc(cfg['method'])}</b>,
group {latest['plan']['group_size']}, widths {cfg['widths'] or 'default'}, text <code>{esc(cfg['text'])}</code>.
Verified on {latest['verify_tokens'][0]} held-out windows of {latest['verify_tokens'][1]} tokens;
float perplexity there {latest['reference']['float_ppl']:.3f}.</p>
<p>Latest plan ({latest['budget']:g} bits): <code>{bits}</code></p>
<table><tr><th>budget</th><th>grid bits</th><th>target</th><th>storage bits</th><th>MB</th><th>predicted MB</th>
<th>reference PPL</th><th>bundle PPL</th><th>top-1 vs reference</th><th>top-1 vs float</th><th>tok/s</th><th>bundle</th></tr>
{''.join(rows)}</table>
{''.join(f'<h2>{esc(t)}</h2><img src="{esc(f)}" alt="{esc(t)}">' for f, t in pics)}
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
