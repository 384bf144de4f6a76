"""ONNX export: onnxruntime must compute the fake-quant reference, with real low-bit weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lieq_export.backends import onnx as ox
from lieq_export.models import describe
from lieq_export.plan import BitPlan
from lieq_export.quantize import fake_quantize, quantize_model
from tests.conftest import tiny_model

SEQ = 16
REL_TOL = 2e-2


def trained_tiny(arch: str, hidden: int, layers: int = 4, steps: int = 40, seed: int = 0):
    """A tiny random-config model trained on a fixed token pattern, so its argmax is decisive."""
    m = tiny_model(arch, seed=seed, layers=layers, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(3, 256, (2, 32), generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(steps):
        loss = m(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m, data


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tokenizers import pre_tokenizers

    vocab = {f"t{i}": i for i in range(256)}
    vocab.update({"<s>": 1, "</s>": 2})
    del vocab["t1"], vocab["t2"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="<s>", eos_token="</s>")


def rel_err_per_position(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(-1) / np.abs(b).max(-1)


def torch_greedy(model, ids, n):
    out = []
    cur = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(cur).logits[0, -1].argmax())
            out.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
    return out


def check_bundle(bundle, ref, prompt, plan, layout, tmp_path, size_tol=0.10, full_file=False, int8_tol=None):
    manifest = json.loads((bundle / "manifest.json").read_text())
    opt_path = tmp_path / "optimized.onnx"
    dec = ox.OnnxDecoder(bundle, optimized_path=opt_path)  # the session options the bundle asks for
    assert dec.accuracy_level == manifest["accuracy_level"] == ox.DEFAULT_ACCURACY_LEVEL

    # 1. logits at every position of a 16-token sequence
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0].numpy()
    err = rel_err_per_position(dec.logits(prompt), want)
    assert err.max() < REL_TOL, f"rel error per position {np.round(err, 4)}"
    if int8_tol is not None:  # onnxruntime's default for fused MatMulNBits: int8 activations
        err8 = rel_err_per_position(ox.OnnxDecoder(bundle, accuracy_level=4).logits(prompt), want)
        assert err8.max() < int8_tol, f"int8-activation rel error per position {np.round(err8, 4)}"

    # 2. the KV-cache path: greedy continuation identical to PyTorch, in onnxruntime and genai
    n_new = 16
    expect = torch_greedy(ref, prompt[:4], n_new)
    assert dec.greedy(prompt[:4], n_new) == expect
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass
    else:
        assert ox.genai_greedy(bundle, prompt[:4], n_new) == expect

    # 3. every quantized linear became MatMulNBits; no DQ -> MatMul left
    fused = ox.count_fused(opt_path)
    n_quant = len(manifest["quantized_linears"])
    assert not fused["unfused_dq_matmul"], fused["unfused_dq_matmul"][:5]
    assert fused["ops"].get("MatMulNBits", 0) == n_quant, fused["ops"]

    # 4. bytes on disk vs the plan's prediction
    pred = plan.accounting(layout)["predicted_bytes"]["onnx"]
    assert manifest["predicted_onnx_bytes"] == pred
    actual = manifest["onnx_bytes"] if full_file else manifest["initializer_bytes"]
    assert abs(actual - pred) / pred < size_tol, (actual, pred)
    files = manifest["files"]
    assert manifest["onnx_bytes"] == sum((bundle / f).stat().st_size for f in files if f.startswith("model.onnx"))
    return manifest, dec


def two_bit_on_disk(bundle, layout, plan):
    """Bits per weight of every 2-bit linear's code initializer, read back from model.onnx."""
    import onnx

    m = onnx.load(str(bundle / "model.onnx"), load_external_data=True)
    inits = {t.name: t for t in m.graph.initializer}
    out = []
    for layer, bits in zip(layout.layers, plan.layer_bits):
        if bits != 2:
            continue
        for spec in layer.linears:
            t = inits[f"{spec.path}.weight_q"]
            assert t.data_type == onnx.TensorProto.INT2
            raw = t.raw_data if t.raw_data else None
            assert raw is not None
            out.append(len(raw) * 8 / spec.params)
    return out


CASES = {
    # arch, hidden, plan kwargs: a 2/3/4/8 mix; hidden 96 makes per-row 8-bit tables non power of two
    "llama": ("llama", 64, dict(layer_bits=(2, 3, 4, 8), group_size=32, embed_bits=4, lm_head_bits=8)),
    "qwen3": ("qwen3", 96, dict(layer_bits=(8, 2, 4, 3), group_size=32, embed_bits=8, lm_head_bits=4, symmetric=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_export_matches_fake_quant_reference(case, tmp_path):
    arch, hidden, pkw = CASES[case]
    model, data = trained_tiny(arch, hidden)
    layout = describe(model)
    plan = BitPlan(**pkw)
    qw = quantize_model(model, plan, progress=False)
    ref = fake_quantize(model, qw)
    bundle = tmp_path / "bundle"
    manifest = ox.export_onnx(model, qw, bundle, tokenizer=_tokenizer(), plan=plan)
    for f in ("model.onnx", "genai_config.json", "plan.json", "manifest.json", "tokenizer.json"):
        assert (bundle / f).is_file(), f
    assert BitPlan.load(bundle / "plan.json") == plan
    prompt = data[0, :SEQ].tolist()
    check_bundle(bundle, ref, prompt, plan, layout, tmp_path, int8_tol=REL_TOL)
    assert [l["grid_bits"] for l in manifest["layers"]] == list(plan.layer_bits)
    assert [l["storage_bits"] for l in manifest["layers"]] == [ox.CONTAINER_BITS[b] for b in plan.layer_bits]
    assert two_bit_on_disk(bundle, layout, plan) == [2.0] * 7
    assert manifest["vocab_size"] == 256 and manifest["bos_token_id"] == 1 and manifest["eos_token_id"] == 2
    # no temporary folders left beside the bundle
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_codes_serialized_unchanged(tmp_path):
    """The initializers hold exactly the checkpoint's codes, scales and zero points."""
    import onnx

    model = tiny_model("llama", layers=2)
    plan = BitPlan((2, 3), 32, embed_bits=None, lm_head_bits=None)
    qw = quantize_model(model, plan, progress=False)
    ox.export_onnx(model, qw, tmp_path / "b", plan=plan)
    m = onnx.load(str(tmp_path / "b" / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        q = qw[path]
        cb = ox.CONTAINER_BITS[q.bits]
        t = inits[f"{path}.weight_q"]
        codes = ox.unpack_signed(t.raw_data, cb, q.codes.numel()).reshape(q.codes.shape[1], -1).T
        np.testing.assert_array_equal(codes, q.codes.numpy())
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[f"{path}.scales"]).T, q.scales.numpy())
        zp = ox.unpack_signed(inits[f"{path}.zero_points"].raw_data, cb, q.zero_points.numel())
        np.testing.assert_array_equal(zp.reshape(q.zero_points.shape[1], -1).T, q.zero_points.numpy())


def test_pack_round_trip():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        for n in (1, 3, 7, 64):
            c = rng.integers(lo, hi + 1, n).astype(np.int8)
            np.testing.assert_array_equal(ox.unpack_signed(ox.pack_signed(c, bits), bits, n), c)


def test_external_data_and_float_export(tmp_path):
    model = tiny_model("qwen3", layers=2)
    ox.export_onnx(model, {}, tmp_path / "b", external_data=True)
    assert (tmp_path / "b" / "model.onnx.data").is_file()
    dec = ox.OnnxDecoder(tmp_path / "b")
    ids = list(range(3, 3 + SEQ))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err_per_position(dec.logits(ids), want).max() < 1e-4


def test_failed_export_leaves_nothing(tmp_path):
    model = tiny_model("llama", layers=2)
    plan = BitPlan((4, 4), 32, embed_bits=None, lm_head_bits=None)
    qw = quantize_model(model, plan, progress=False)
    qw["model.layers.0.mlp.up_proj"] = qw["model.layers.0.mlp.down_proj"]  # wrong shape
    with pytest.raises(ox.OnnxExportError, match="up_proj"):
        ox.export_onnx(model, qw, tmp_path / "b", plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_left_padded_batch_matches_single(tmp_path):
    """attention_mask / position_ids semantics as onnxruntime-genai feeds them."""
    model = tiny_model("llama", layers=2)
    ox.export_onnx(model, {}, tmp_path / "b")
    dec = ox.OnnxDecoder(tmp_path / "b")
    ids = [5, 6, 7, 8, 9]
    single = dec.logits(ids)
    padded = np.array([[0, 0] + ids], np.int64)
    mask = np.array([[0, 0] + [1] * len(ids)], np.int64)
    lg, _ = dec.step(padded, mask, dec.empty_cache())
    np.testing.assert_allclose(lg[0, 2:], single, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_mixed_plan(smollm2, tmp_path):
    """The real 135M model with a {2,3,4,8} plan: same checks, bytes of the whole file."""
    model, tok = smollm2
    layout = describe(model)
    plan = BitPlan(tuple((2, 3, 4, 8)[i % 4] for i in range(layout.num_layers)), 64)
    qw = quantize_model(model, plan, progress=False)
    ref = fake_quantize(model, qw)
    bundle = tmp_path / "bundle"
    manifest = ox.export_onnx(model, qw, bundle, tokenizer=tok, plan=plan)
    prompt = tok("The capital of France is Paris. The capital of Germany is Berlin, and the capital of")["input_ids"][:SEQ]
    assert len(prompt) == SEQ
    check_bundle(bundle, ref, prompt, plan, layout, tmp_path, full_file=True)
    n2 = sum(1 for b in plan.layer_bits if b == 2) * 7
    assert two_bit_on_disk(bundle, layout, plan) == [2.0] * n2
    assert manifest["max_length"] == model.config.max_position_embeddings
    assert manifest["eos_token_id"] == tok.eos_token_id


def test_cli_export_and_generate(tmp_path, capsys):
    from lieq_export.cli import main
    from lieq_export.quantize import save_checkpoint

    model, data = trained_tiny("llama", 64, layers=2, steps=20)
    plan = BitPlan((2, 4), 32, embed_bits=8, lm_head_bits=8)
    qw = quantize_model(model, plan, progress=False)
    save_checkpoint(tmp_path / "ckpt", model, _tokenizer(), plan, qw)
    assert main(["export", str(tmp_path / "ckpt"), "--target", "onnx", "--out", str(tmp_path / "b")]) == 0
    assert "storage bits per layer 2 4" in capsys.readouterr().out
    ref = fake_quantize(model, qw)
    prompt = [t for t in data[0, :8].tolist() if t > 2][:6]
    want = " ".join(f"t{t}" for t in torch_greedy(ref, prompt, 5) if t > 2)
    text = " ".join(f"t{t}" for t in prompt)
    assert main(["generate", str(tmp_path / "b"), "--prompt", text, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == want
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass
    else:
        assert main(["generate", str(tmp_path / "b"), "--prompt", text, "--max-new-tokens", "5", "--genai"]) == 0
        assert capsys.readouterr().out.strip() == want
    # a missing checkpoint is a clean error, not a traceback
    assert main(["export", str(tmp_path / "nope"), "--target", "onnx", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
