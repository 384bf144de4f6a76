"""The `lieq-export` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="built-in name (smollm2-135m), local model directory, .gguf file or hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")


def cmd_info(args) -> int:
    from .models import load_model, describe
    from .plan import BitPlan, default_group_size

    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
    layout = describe(model)
    g = args.group_size or default_group_size(layout)
    print(f"architecture      {layout.architecture}")
    print(f"decoder layers    {layout.num_layers}")
    print(f"hidden / heads    {layout.hidden_size} / {layout.num_heads} q, {layout.num_kv_heads} kv, head_dim {layout.head_dim}"
          + (", q/k norm" if layout.qk_norm else ""))
    print(f"parameters        {layout.total_params:,}")
    print(f"  decoder linears {layout.decoder_linear_params:,} ({layout.decoder_linear_params // layout.num_layers:,} per layer)")
    print(f"  embeddings      {layout.embed.params:,} ({layout.vocab_size} x {layout.hidden_size})")
    print(f"  lm_head         {layout.lm_head.params:,}" + (" (tied to the embeddings)" if layout.tied else ""))
    print(f"default group     {g}")
    print()
    print(f"uniform plans (group {g}, asymmetric; embeddings and lm_head at 8 bits)")
    print(f"{'bits':>4} {'grid bits':>9} {'pte bits':>8} {'onnx bits':>9} {'pte MB':>8} {'onnx MB':>8}")
    for bits in (2, 3, 4, 8):
        acc = BitPlan.uniform(layout, bits, g).accounting(layout)
        sb, pb = acc["storage_bits"], acc["predicted_bytes"]
        print(f"{bits:>4} {acc['avg_grid_bits']:>9.3f} {sb['pte']:>8.3f} {sb['onnx']:>9.3f} "
              f"{pb['pte'] / 1e6:>8.1f} {pb['onnx'] / 1e6:>8.1f}")
    return 0


def _add_text_args(p: argparse.ArgumentParser, calib: int, evals: int) -> None:
    p.add_argument("--text", default="pydoc",
                   help="pydoc (built in, offline), wikitext2, c4, a .txt file or a folder of .txt files")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--calib", type=int, default=calib, help=f"calibration windows (default {calib})")
    p.add_argument("--eval-windows", type=int, default=evals, help=f"held-out evaluation windows (default {evals})")


def _windows(args, tokenizer):
    from .text import load_windows

    return load_windows(tokenizer, args.text, args.calib, args.eval_windows, args.seq_len)


def cmd_score(args) -> int:
    from .models import load_model
    from .scoring import ALL_PROJECTIONS, QKV, ScoreConfig, delta_ppl, save_scores, score_layers, spearman

    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    calib, _ = _windows(args, tok)
    if args.scorer == "qerror":
        from .qerror import QErrorConfig, score_qerror

        widths = args.widths or QErrorConfig.widths
        measure = QErrorConfig.measure_widest if args.measure_widest is None else args.measure_widest
        scores = score_qerror(model, calib, QErrorConfig(widths=widths, group_size=args.group_size,
                                                         symmetric=args.symmetric, measure_widest=measure))
        columns = [("damage@" + b, [d[b] for d in scores["damage"]]) for b in scores["damage"][0]]
    else:
        cfg = ScoreConfig(
            projections=QKV if args.projections == "qkv" else ALL_PROJECTIONS,
            baseline=args.baseline, seed=args.seed, top_k=args.top_k, normalize_rows=args.normalize_rows,
        )
        scores = score_layers(model, calib, cfg)
        columns = [("Δr", scores["scores"]), (f"ΔE_top{cfg.top_k}", [l["energy_gain"] for l in scores["layers"]])]
    if args.delta_ppl:
        scores["delta_ppl"] = delta_ppl(model, calib)
        scores["spearman_delta_ppl"] = spearman(scores["scores"], scores["delta_ppl"]["scores"])
        columns.append(("ΔPPL", scores["delta_ppl"]["scores"]))
    save_scores(args.out, scores)
    print(f"{'layer':>5}" + "".join(f" {name:>11}" for name, _ in columns))
    for i in range(len(scores["scores"])):
        print(f"{i:>5}" + "".join(f" {vals[i]:>11.4g}" for _, vals in columns))
    print(f"scored {len(scores['scores'])} layers ({scores['scorer']}) on {calib.numel():,} tokens in {scores['seconds']:.1f} s")
    if args.delta_ppl:
        print(f"ΔPPL probing: {scores['delta_ppl']['seconds']:.1f} s "
              f"({scores['delta_ppl']['seconds'] / scores['seconds']:.1f}x the score); "
              f"Spearman ρ(score, ΔPPL) = {scores['spearman_delta_ppl']:.3f}")
    print(f"wrote {args.out}")
    return 0


def widths_arg(text: str) -> tuple[int, ...]:
    """--widths '2,4' -> (2, 4), parsed once for score, plan and run."""
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bit widths, e.g. 2,4") from None


def cmd_plan(args) -> int:
    import warnings

    from .allocate import STORED_WIDTHS, TARGET_WIDTHS, allocate, baseline_scores, parse_pins, uniform_bits
    from .models import layout_from_dict
    from .plan import BitPlan, default_group_size
    from .scoring import load_scores

    scores = load_scores(args.scores)
    layout = layout_from_dict(scores["layout"])
    widths = args.widths or TARGET_WIDTHS[args.target]
    if args.target in STORED_WIDTHS:
        widened = sorted(set(widths) - set(STORED_WIDTHS[args.target]))
        if widened:
            warnings.warn(f"{args.target} stores no {widened}-bit weights: those layers take "
                          f"{'4' if args.target == 'pte' else '4 (INT4)'} bits on disk", stacklevel=1)
    if args.allocator == "uniform":
        bits = uniform_bits(layout.num_layers, widths, args.avg_bits)
    else:
        vec = baseline_scores(args.allocator, scores["scores"], scores.get("delta_ppl", {}).get("scores"),
                              layout.num_layers, args.seed)
        damage = None
        if scores["scorer"] == "qerror" and args.allocator == "lieq":
            from .qerror import damage_table

            damage = damage_table(scores, widths)
        bits = allocate(vec, [l.params for l in layout.layers], widths, args.avg_bits, parse_pins(args.pin), damage)
    symmetric = args.symmetric if args.symmetric is not None else args.target == "pte"
    plan = BitPlan(bits, args.group_size or default_group_size(layout), symmetric=symmetric, method=args.method,
                   embed_bits=None if args.embed_bits == 0 else args.embed_bits,
                   lm_head_bits=None if args.lm_head_bits == 0 else args.lm_head_bits,
                   allocator=args.allocator, budget=args.avg_bits)
    plan.save(args.out, layout)
    acc = plan.accounting(layout)
    print("layer bits: " + " ".join(str(b) for b in plan.layer_bits))
    print(f"average grid bits {acc['avg_grid_bits']:.4f} (budget {args.avg_bits}); storage bits "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc["storage_bits"].items()))
    print("predicted bytes " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in acc["predicted_bytes"].items()))
    print(f"wrote {args.out}")
    if getattr(args, "format", "json") != "json":
        from .formats import render

        text = render(args.format, plan, layout)
        print(text)
        if args.format_out:
            from .io import atomic_write_text

            atomic_write_text(args.format_out, text + "\n")
            print(f"wrote {args.format_out}")
    return 0


def _quantized_reference(args, model, calib):
    """(plan, qweights, reference) from --plan, or from --checkpoint without requantizing."""
    from .plan import BitPlan
    from .quantize import fake_quantize, load_checkpoint, quantize_model

    if args.checkpoint:
        ref, _, plan, qweights = load_checkpoint(args.checkpoint)
        return plan, qweights, ref
    plan = BitPlan.load(args.plan)
    if getattr(args, "method", None):
        from dataclasses import replace

        plan = replace(plan, method=args.method)
    qweights = quantize_model(model, plan, calib=calib)
    return plan, qweights, fake_quantize(model, qweights)


def cmd_quantize(args) -> int:
    from .models import load_model
    from .quantize import save_checkpoint

    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    calib, _ = _windows(args, tok)
    plan, qweights, _ = _quantized_reference(args, model, calib)
    save_checkpoint(args.out, model, tok, plan, qweights)
    print(f"wrote {args.out} ({plan.method}, {len(qweights)} quantized tensors)")
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import compare, perplexity
    from .io import atomic_write_text
    from .models import describe, load_model

    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    calib, evals = _windows(args, tok)
    plan, _, ref = _quantized_reference(args, model, calib)
    result = {"float_ppl": perplexity(model, evals), **compare(ref, model, evals),
              "plan": plan.to_dict(describe(model)), "eval_tokens": evals.numel()}
    print(f"float PPL {result['float_ppl']:.3f}")
    print(f"quantized PPL {result['ppl']:.3f}  KL {result['kl']:.4f}  top-1 {result['top1']:.4f}  "
          f"({result['plan']['accounting']['avg_grid_bits']:.3f} avg bits, {evals.numel():,} held-out tokens)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _add_core(sub) -> None:
    p = sub.add_parser("score", help="per-layer scores: quantization damage (qerror) or the LieQ proxy; optional ΔPPL")
    _add_model_args(p)
    _add_text_args(p, calib=4, evals=0)
    p.add_argument("--scorer", choices=("lieq", "qerror"), default="qerror",
                   help="qerror (default: its plans beat the proxy's in benchmarks/results/quality.md): each "
                        "layer's own quantization damage; lieq: the paper's geometry proxy")
    p.add_argument("--projections", choices=("qkv", "all"), default="qkv", help="lieq: qkv (default) or all seven")
    p.add_argument("--baseline", choices=("random_proj", "random_model"), default="random_proj",
                   help="random-init projection on the trained states (default), or a random model on its own states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=8, help="k of the top-k energy diagnostic")
    p.add_argument("--normalize-rows", action="store_true", help="mean-centre and L2-normalize token rows first")
    p.add_argument("--group-size", type=int, default=None, help="qerror: the plan's group size (default: largest that fits)")
    p.add_argument("--symmetric", action="store_true", help="qerror: measure symmetric grids")
    p.add_argument("--widths", type=widths_arg, default=None,
                   help="qerror: widths to measure (default 2,3,4,8; give the plan's, e.g. 4,8: fewer passes)")
    p.add_argument("--measure-widest", action=argparse.BooleanOptionalAction, default=None,
                   help="qerror: run the widest width too (the default); --no-measure-widest extrapolates it from "
                        "the next narrower one: one layer pass fewer, plans a little further from the ΔPPL oracle's "
                        "(benchmarks/results/choices_widest.md)")
    p.add_argument("--delta-ppl", action="store_true", help="also probe ΔPPL with each layer removed (L+1 passes)")
    p.add_argument("--out", default="scores.json")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="allocate one bit width per layer under an average-bit budget")
    p.add_argument("scores", help="scores JSON from `lieq-export score`")
    p.add_argument("--avg-bits", type=float, required=True, help="average bits per decoder-linear weight (a cap)")
    p.add_argument("--widths", type=widths_arg, default=None,
                   help="comma-separated widths, e.g. 2,4 or 2,3,4 (default by --target)")
    p.add_argument("--target", choices=("pte", "onnx"), default=None,
                   help="pte: widths 4,8 and symmetric (XNNPACK); onnx: widths 2,4,8")
    p.add_argument("--allocator", choices=("lieq", "random", "reversed", "oracle", "uniform"), default="lieq",
                   help="lieq: rank by the scores file (whichever scorer wrote it); the others are baselines")
    p.add_argument("--seed", type=int, default=0, help="for --allocator random")
    p.add_argument("--pin", action="append", default=[], metavar="LAYER=BITS", help="fix a layer's width")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    p.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="base quantizer")
    p.add_argument("--embed-bits", type=int, default=8, help="4, 8, or 0 for float")
    p.add_argument("--lm-head-bits", type=int, default=8, help="4, 8, or 0 for float")
    p.add_argument("--out", default="plan.json")
    p.add_argument("--format", choices=("json", "llama.cpp", "gptqmodel", "autoround"), default="json",
                   help="also print the plan as llama-quantize --tensor-type arguments, a GPTQModel "
                        "QuantizeConfig(dynamic=...) or an AutoRound layer_config")
    p.add_argument("--format-out", default=None, help="write that --format output to this file too")
    p.set_defaults(func=cmd_plan)

    for name, fn, text in (("quantize", cmd_quantize, "quantize a model by a plan into a checkpoint"),
                           ("eval", cmd_eval, "perplexity, KL and top-1 agreement against the float model")):
        p = sub.add_parser(name, help=text)
        _add_model_args(p)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--plan", help="plan JSON from `lieq-export plan`")
        if name == "eval":
            src.add_argument("--checkpoint", help="quantized checkpoint (no requantization)")
        p.add_argument("--method", choices=("rtn", "gptq"), default=None, help="override the plan's base quantizer")
        _add_text_args(p, calib=16, evals=8)
        if name == "quantize":
            p.add_argument("--out", required=True, help="checkpoint folder")
            p.set_defaults(checkpoint=None)
        else:
            p.add_argument("--json", default=None, help="also write the results here")
        p.set_defaults(func=fn)


def cmd_run(args) -> int:
    import time

    from .pipeline import RunConfig, run_pipeline

    t0 = time.perf_counter()
    cfg = RunConfig(
        model=args.model, text=args.text, avg_bits=args.avg_bits,
        widths=args.widths,
        targets=tuple(args.targets.split(",")), scorer=args.scorer, method=args.method,
        group_size=args.group_size, seq_len=args.seq_len, calib_windows=args.calib, eval_windows=args.eval_windows,
        verify_tokens=args.verify_tokens, max_seq_len=args.max_seq_len, delta_ppl=args.delta_ppl,
        trust_remote_code=args.trust_remote_code,
    )
    res = run_pipeline(cfg, args.out)
    print(f"plan ({res['accounting']['avg_grid_bits']:.3f} avg bits): " + " ".join(map(str, res["plan"]["layer_bits"])))
    print(f"float PPL {res['reference']['float_ppl']:.3f}, reference PPL {res['reference']['reference_ppl']:.3f}")
    for t, v in res["targets"].items():
        print(f"{t:>4}: {v['bundle']}  {v['model_bytes'] / 1e6:.1f} MB  PPL {v['ppl']:.3f}  "
              f"top-1 vs reference {v['top1_vs_reference']:.4f}  {v['tokens_per_s']:.1f} tok/s")
    cached = [s["stage"] for s in res["stages"] if s["cached"]]
    print(f"report: {args.out}/report.html  ({time.perf_counter() - t0:.0f} s"
          + (f"; reused {', '.join(cached)}" if cached else "") + ")")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="score, plan, quantize, export, verify and report in one go")
    _add_model_args(p)
    p.add_argument("--avg-bits", type=float, default=4.5, help="average bits per decoder-linear weight (default 4.5)")
    p.add_argument("--widths", type=widths_arg, default="4,8", help="candidate widths (default 4,8; the paper's mode: 2,4)")
    p.add_argument("--targets", default="pte,onnx")
    p.add_argument("--scorer", choices=("lieq", "qerror"), default="qerror")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--group-size", type=int, default=None)
    _add_text_args(p, calib=16, evals=4)
    p.add_argument("--verify-tokens", type=int, default=128, help="tokens per held-out window run through each bundle")
    p.add_argument("--max-seq-len", type=int, default=512, help="context length of the exported bundles")
    p.add_argument("--delta-ppl", action="store_true", help="also validate the scores by ΔPPL probing (L+1 passes)")
    p.add_argument("--out", default="lieq-out", help="output folder (reused across budgets)")
    p.set_defaults(func=cmd_run)


# ---- export / generate (ExecuTorch .pte; ONNX via backends.onnx) ----------------------


def cmd_export(args) -> int:
    import warnings

    if args.target == "pte":
        from .backends.pte import export_checkpoint

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library noise; our own warnings are in the manifest
            man = export_checkpoint(args.checkpoint, args.out, max_seq_len=args.max_seq_len)
        for w in man["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        print(f"wrote {args.out}: model.pte {man['pte_bytes'] / 1e6:.1f} MB "
              f"(predicted {man['predicted_pte_bytes'] / 1e6:.1f} MB), max length {man['max_seq_len']}, "
              f"{man['timings_s']['total_s']:.0f} s")
        return 0
    from .backends.onnx import export_onnx
    from .quantize import load_checkpoint

    model, tok, plan, qweights = load_checkpoint(args.checkpoint)
    man = export_onnx(model, qweights, args.out, tokenizer=tok, plan=plan, max_length=args.max_seq_len,
                      **({} if args.accuracy_level is None else {"accuracy_level": args.accuracy_level}))
    print(f"wrote {args.out}: model.onnx {man['onnx_bytes'] / 1e6:.1f} MB "
          f"(predicted {man['predicted_onnx_bytes'] / 1e6:.1f} MB), storage bits per layer "
          + " ".join(str(l["storage_bits"]) for l in man["layers"])
          + f", max length {man['max_length']}, {man['export_seconds']:.0f} s")
    return 0


def cmd_generate(args) -> int:
    from .backends.onnx import is_bundle

    if is_bundle(args.bundle):  # ONNX bundle: onnxruntime (or onnxruntime-genai with --genai)
        from .backends.onnx import generate

        print(generate(args.bundle, args.prompt, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                       temperature=args.temperature, seed=args.seed, use_genai=args.genai,
                       accuracy_level=args.accuracy_level))
        return 0
    from .backends.pte import generate_text

    text = generate_text(args.bundle, args.prompt, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                         temperature=args.temperature, seed=args.seed, use_runner=args.runner)
    print(text)
    return 0


def _add_export_generate(sub) -> None:
    p = sub.add_parser("export", help="lower a quantized checkpoint to a deployable bundle (.pte or ONNX)")
    p.add_argument("checkpoint", help="quantized checkpoint folder (from `lieq-export quantize`)")
    p.add_argument("--target", choices=("pte", "onnx"), default="pte", help="pte: ExecuTorch + XNNPACK (default)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--max-seq-len", type=int, default=512, help="static KV-cache length (default 512)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="onnx: MatMulNBits compute the bundle asks onnxruntime for (default 1 = float32, "
                        "matches the reference; 4 = int8 activations, faster, esp. 2-bit, but drifts)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text from an exported bundle (.pte or ONNX)")
    p.add_argument("bundle", help="bundle folder written by `lieq-export export`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --top-p")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--runner", action="store_true", help="use ExecuTorch's C++ TextLLMRunner")
    p.add_argument("--genai", action="store_true", help="ONNX bundles: run with onnxruntime-genai (greedy)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="ONNX bundles: override the bundle's MatMulNBits accuracy level")
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lieq-export",
        description="Layer-wise mixed-bit quantization (LieQ) of small LLMs, exported to ExecuTorch and ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"lieq-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="architecture, parameter counts and uniform-plan accounting of a model")
    _add_model_args(p)
    p.add_argument("--group-size", type=int, default=None, help="group size (default: largest of 128/64/32 that fits)")
    p.set_defaults(func=cmd_info)

    _add_core(sub)
    _add_run(sub)
    _add_export_generate(sub)
    from .chat import add_chat_parser

    add_chat_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # every lieq-export error type derives from these
        print(f"lieq-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
