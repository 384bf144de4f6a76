"""One command from model to verified edge bundles: score → plan → quantize → export → verify → report.

Every stage writes its output atomically under the output folder together with the key
of its inputs (`stage.json`); a later run whose inputs hash to the same key reuses it.
So a second run with another budget reuses the scores, and an interrupted run resumes
at the first stage that had not finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import atomic_dir, atomic_write_text, ensure_writable_dir

TARGETS = ("pte", "onnx")
STAGE_FILE = "stage.json"


class PipelineError(ValueError):
    pass


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    text: str = "pydoc"
    avg_bits: float = 4.5
    widths: tuple[int, ...] = (4, 8)  # both backends store these natively; the paper's {2,4} is an option
    targets: tuple[str, ...] = TARGETS
    scorer: str = "qerror"
    method: str = "gptq"
    group_size: int | None = None
    embed_bits: int | None = 8
    lm_head_bits: int | None = 8
    seq_len: int = 512
    score_windows: int = 4
    calib_windows: int = 16
    eval_windows: int = 4
    verify_tokens: int = 128  # per evaluation window, through each bundle's runtime
    max_seq_len: int = 512
    delta_ppl: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise PipelineError(f"unknown targets {bad}; choose from {list(TARGETS)}")
        if self.scorer not in ("lieq", "qerror"):
            raise PipelineError(f"scorer {self.scorer!r} is unknown; use lieq or qerror")
        if self.verify_tokens > self.seq_len:
            raise PipelineError("verify_tokens cannot exceed seq_len")

    @property
    def plan_widths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.widths)))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(folder: Path, key: str) -> bool:
    f = folder / STAGE_FILE
    return f.is_file() and json.loads(f.read_text()).get("key") == key


def _mark(folder: Path, key: str, **info) -> None:
    (folder / STAGE_FILE).write_text(json.dumps({"key": key, **info}, indent=2) + "\n")


def _budget_tag(b: float) -> str:
    return f"{b:g}bit"


@dataclass
class Run:
    cfg: RunConfig
    out: Path
    log: list = field(default_factory=list)

    def stage(self, name: str, folder: Path, key: str, build) -> tuple[Path, bool]:
        """Run `build(tmp_folder)` unless `folder` already holds this key's result."""
        if _cached(folder, key):
            self.log.append({"stage": name, "cached": True, "seconds": 0.0})
            return folder, True
        t0 = time.perf_counter()
        with atomic_dir(folder) as tmp:
            build(tmp)
            _mark(tmp, key, stage=name)
        self.log.append({"stage": name, "cached": False, "seconds": time.perf_counter() - t0})
        return folder, False


def run_pipeline(cfg: RunConfig, out_dir, progress: bool = True) -> dict:
    """Run every stage for one budget; returns this budget's results (also in runs/<budget>.json)."""
    from .evaluate import perplexity, reference_logprobs
    from .models import describe, load_model, model_fingerprint
    from .plan import BitPlan, default_group_size
    from .quantize import load_checkpoint, quantize_model, save_checkpoint
    from .text import load_windows, text_fingerprint

    out = ensure_writable_dir(out_dir)
    run = Run(cfg, out)
    stages = tqdm(total=4 + 2 * len(cfg.targets), desc="lieq-export run", disable=not progress)
    t_start = time.perf_counter()

    model, tok = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    layout = describe(model)
    calib, evals = load_windows(tok, cfg.text, max(cfg.calib_windows, cfg.score_windows), cfg.eval_windows, cfg.seq_len)
    model_fp = model_fingerprint(model)
    group = cfg.group_size or default_group_size(layout)

    # 1. scores: independent of the budget, so every budget run in this folder shares them
    score_win = calib[: cfg.score_windows]
    # One plan serves every target, so the bundles compute the same function; XNNPACK
    # stores only symmetric 4/8-bit weights, so a plan that goes to .pte is symmetric.
    symmetric = "pte" in cfg.targets
    # only qerror measures the plan's grid, and only at the plan's widths; the key holds the
    # whole scorer config, so a changed scorer default does not reuse an older folder's scores
    from .qerror import QErrorConfig

    qcfg = QErrorConfig(widths=cfg.plan_widths, group_size=group, symmetric=symmetric) if cfg.scorer == "qerror" else None
    score_key = _key("score", model_fp, text_fingerprint(score_win), cfg.scorer, qcfg, cfg.delta_ppl)

    def build_scores(tmp: Path):
        from .scoring import delta_ppl, save_scores, score_layers, spearman

        if qcfg is not None:
            from .qerror import score_qerror

            s = score_qerror(model, score_win, qcfg, progress=progress)
        else:
            s = score_layers(model, score_win, progress=progress)
        if cfg.delta_ppl:
            s["delta_ppl"] = delta_ppl(model, score_win, progress=progress)
            s["spearman_delta_ppl"] = spearman(s["scores"], s["delta_ppl"]["scores"])
        save_scores(tmp / "scores.json", s)

    score_dir, _ = run.stage("score", out / "scores", score_key, build_scores)
    scores = json.loads((score_dir / "scores.json").read_text())
    stages.update()

    # 2. plan
    from .allocate import allocate

    widths = cfg.plan_widths
    damage = None
    if scores["scorer"] == "qerror":
        from .qerror import damage_table

        damage = damage_table(scores, widths)
    bits = allocate(scores["scores"], [l.params for l in layout.layers], widths, cfg.avg_bits, damage=damage)
    plan = BitPlan(bits, group, symmetric=symmetric, method=cfg.method, embed_bits=cfg.embed_bits,
                   lm_head_bits=cfg.lm_head_bits, allocator=cfg.scorer, budget=cfg.avg_bits)
    tag = _budget_tag(cfg.avg_bits)
    atomic_write_text(out / f"plan-{tag}.json", plan.to_json(layout) + "\n")
    stages.update()

    # 3. quantize
    q_key = _key("quantize", model_fp, text_fingerprint(calib[: cfg.calib_windows]), plan.to_dict())
    ckpt_dir, _ = run.stage("quantize", out / f"checkpoint-{tag}", q_key, lambda tmp: save_checkpoint(
        tmp, model, tok, plan, quantize_model(model, plan, calib=calib[: cfg.calib_windows], progress=progress)))
    ref, _, _, qweights = load_checkpoint(ckpt_dir)
    stages.update()

    # reference numbers on the held-out windows, cut to what the bundles are verified on
    ver = evals[:, : cfg.verify_tokens]
    ref_lp = reference_logprobs(ref, ver, progress=False)
    float_lp = reference_logprobs(model, ver, progress=False)
    reference = {
        "float_ppl": perplexity(model, ver, progress=False),
        "reference_ppl": perplexity(ref, ver, progress=False),
        "reference_top1_vs_float": _agreement(ref_lp, float_lp),
    }
    stages.update()

    # 4. export and verify each target
    targets = {}
    for target in cfg.targets:
        e_key = _key("export", q_key, target, cfg.max_seq_len)
        bundle, _ = run.stage(f"export {target}", out / f"{target}-{tag}", e_key,
                              lambda tmp, target=target: _export(target, ckpt_dir, tmp, cfg.max_seq_len))
        stages.update()
        targets[target] = _verify(target, bundle, ver, ref_lp, float_lp, tok)
        targets[target]["bundle"] = str(bundle)
        stages.update()
    stages.close()

    acc = plan.accounting(layout)
    result = {
        "config": asdict(cfg),
        "budget": cfg.avg_bits,
        "plan": plan.to_dict(),
        "accounting": acc,
        "scores": {"scorer": scores["scorer"], "values": scores["scores"],
                   "delta_ppl": scores.get("delta_ppl", {}).get("scores"),
                   "spearman_delta_ppl": scores.get("spearman_delta_ppl")},
        "reference": reference,
        "targets": targets,
        "verify_tokens": list(ver.shape),
        "stages": run.log,
        "seconds": time.perf_counter() - t_start,
    }
    runs = ensure_writable_dir(out / "runs")
    atomic_write_text(runs / f"{tag}.json", json.dumps(result, indent=2) + "\n")
    from .report import write_report

    write_report(out)
    return result


def _export(target: str, ckpt_dir: Path, tmp: Path, max_seq_len: int) -> None:
    import warnings

    # Exporters write their bundle into a folder they create; give them a child of tmp
    # and lift its files up, so the stage folder itself stays atomic.
    bundle = tmp / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the manifests record the warnings that matter
        if target == "pte":
            from .backends.pte import export_checkpoint

            export_checkpoint(ckpt_dir, bundle, max_seq_len=max_seq_len)
        else:
            from .backends.onnx import export_onnx
            from .quantize import load_checkpoint

            model, tok, plan, qweights = load_checkpoint(ckpt_dir)
            export_onnx(model, qweights, bundle, tokenizer=tok, plan=plan, max_length=max_seq_len)
    for f in bundle.iterdir():
        f.rename(tmp / f.name)
    bundle.rmdir()


def _agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    same = sum((x.argmax(-1) == y.argmax(-1)).sum().item() for x, y in zip(a, b))
    return same / sum(x.shape[0] for x in a)


def _bundle_logprobs(target: str, bundle: Path, windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Log-probabilities the bundle's own runtime gives at every position, and the decode speed."""
    import torch.nn.functional as F

    out = []
    t0 = time.perf_counter()
    n_tokens = 0
    if target == "pte":
        from .backends.pte import PteModel

        m = PteModel(bundle)
        for w in windows:
            m.reset()
            out.append(F.log_softmax(m.logits_per_position(w.tolist()), -1))
            n_tokens += len(w)
    else:
        from .backends.onnx import OnnxDecoder

        import numpy as np

        m = OnnxDecoder(bundle)
        for w in windows:
            # token by token, as a decoder runs on device, so the speed below is decode speed
            cache = m.empty_cache()
            rows = []
            for i, t in enumerate(w.tolist()):
                logits, cache = m.step(np.array([[t]]), np.ones((1, i + 1), np.int64), cache)
                rows.append(torch.from_numpy(logits[0, -1]).float())
            out.append(F.log_softmax(torch.stack(rows), -1))
            n_tokens += len(w)
    return out, n_tokens / (time.perf_counter() - t0)


def _verify(target: str, bundle: Path, windows, ref_lp, float_lp, tok) -> dict:
    import math

    import torch.nn.functional as F

    lp, tok_s = _bundle_logprobs(target, bundle, windows)
    nll = sum(F.nll_loss(x[:-1], w[1:], reduction="sum").item() for x, w in zip(lp, windows))
    n = sum(len(w) - 1 for w in windows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {f.name: f.stat().st_size for f in bundle.iterdir() if f.is_file()}
    return {
        "ppl": math.exp(nll / n),
        "top1_vs_reference": _agreement(lp, ref_lp),
        "top1_vs_float": _agreement(lp, float_lp),
        "max_abs_logprob_diff": max((x - y).abs().max().item() for x, y in zip(lp, ref_lp)),
        "tokens_per_s": tok_s,
        "files": files,
        "model_bytes": files.get("model.pte", 0) + files.get("model.onnx", 0) + files.get("model.onnx.data", 0),
        "predicted_bytes": manifest.get(f"predicted_{target}_bytes"),
    }
