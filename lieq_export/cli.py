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
