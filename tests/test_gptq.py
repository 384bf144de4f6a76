"""GPTQ: lower layer-output error than RTN, the same QuantizedWeight layout, deterministic,
and a whole-model pass on tiny Llama / Qwen3 that beats RTN end to end."""

import pytest
import torch

from conftest import tiny_model
from lieq_export.evaluate import compare
from lieq_export.gptq import gptq_quantize_model, gptq_quantize_weight
from lieq_export.models import describe
from lieq_export.plan import BitPlan
from lieq_export.quant import QuantizationError, code_range, quantize_rtn
from lieq_export.quantize import fake_quantize, quantize_model

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tests run many small ops; on a busy 2-core machine extra OpenMP threads only wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated(n=2048, d=256, rank=16, noise=0.1, seed=0):
    """Inputs X [n, d] = low-rank + small noise, and a weight [64, d]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + noise * torch.randn(n, d, generator=g)
    W = torch.randn(64, d, generator=g)
    return X, W


def hessian(X):
    return 2 * X.T @ X / X.shape[0]


def output_error(X, W, qw):
    return (X @ W.T - X @ qw.dequantize().T).norm().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order, symmetric):
    X, W = correlated()
    g = gptq_quantize_weight(W, hessian(X), bits, 64, symmetric, act_order=act_order)
    r = quantize_rtn(W, bits, 64, symmetric)
    assert output_error(X, W, g) < 0.8 * output_error(X, W, r)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, 256)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_layout_ranges_and_determinism(bits, group, act_order, symmetric):
    X, W = correlated(n=512, seed=1)
    H = hessian(X)
    q = gptq_quantize_weight(W, H, bits, group, symmetric, act_order=act_order)
    lo, hi = code_range(bits)
    assert q.codes.dtype == torch.int8 and q.shape == tuple(W.shape)
    assert q.bits == bits and q.group_size == group
    assert tuple(q.scales.shape) == (64, 256 // group) and q.scales.dtype == torch.float32
    assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
    # scales are bf16-exact, as RTN's
    assert torch.equal(q.scales.to(torch.bfloat16).float(), q.scales)
    assert (q.scales > 0).all()
    if symmetric:
        assert q.zero_points is None
    else:
        assert q.zero_points.dtype == torch.int8 and tuple(q.zero_points.shape) == tuple(q.scales.shape)
        assert lo <= int(q.zero_points.min()) and int(q.zero_points.max()) <= hi
    assert q.equal(gptq_quantize_weight(W.clone(), H.clone(), bits, group, symmetric, act_order=act_order))


def test_static_groups_use_original_columns():
    """With act-order the grids are those of the original weight groups (RTN's grid)."""
    X, W = correlated(n=512, seed=2)
    q = gptq_quantize_weight(W, hessian(X), 4, 64, act_order=True)
    r = quantize_rtn(W, 4, 64)
    assert torch.equal(q.scales, r.scales) and torch.equal(q.zero_points, r.zero_points)
    assert not torch.equal(q.codes, r.codes)


def test_dead_inputs_and_bad_shapes():
    X, W = correlated(n=512, seed=3)
    X[:, 5] = 0  # an input that never fires: its column is zeroed, not NaN
    q = gptq_quantize_weight(W, hessian(X), 3, 64)
    assert torch.isfinite(q.dequantize()).all()
    assert float(q.dequantize()[:, 5].abs().max()) == 0.0
    with pytest.raises(QuantizationError):
        gptq_quantize_weight(W, hessian(X)[:10, :10], 3, 64)
    with pytest.raises(QuantizationError):
        gptq_quantize_weight(W, hessian(X), 3, 48)


# --- model level -------------------------------------------------------------


def pattern(n, seq, seed):
    """Windows following one fixed permutation of the vocabulary: next = PERM[current]."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, seq):
        x[:, t] = perm[x[:, t - 1]]
    return x


_TRAINED = {}


def trained(arch):
    """A tiny model trained a few steps on the pattern, so its predictions mean something."""
    if arch not in _TRAINED:
        m = tiny_model(arch, layers=2)
        m.train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for step in range(60):
            x = pattern(16, 32, step)
            loss = m(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        _TRAINED[arch] = m
    return _TRAINED[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_mixed_plan_covers_every_tensor(arch):
    model = tiny_model(arch, layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = describe(model)
    plan = BitPlan((2, 3, 4, 8), 32, method="gptq")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    q = quantize_model(model, plan, calib, progress=False)
    assert set(q) == {spec.path for spec, _ in plan.quantized_tensors(layout)}
    for spec, bits in plan.quantized_tensors(layout):
        qw = q[spec.path]
        assert qw.bits == bits and qw.shape == (spec.out_features, spec.in_features)
        assert qw.group_size == plan.group_size_for(bits, spec.in_features)
    # the embedding is RTN, exactly
    assert q["model.embed_tokens"].equal(quantize_rtn(model.model.embed_tokens.weight, 8, 64))
    # the model is left untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # deterministic
    again = gptq_quantize_model(model, plan, calib, progress=False)
    assert all(q[k].equal(again[k]) for k in q)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order,margin", [(False, 0.9), (True, 0.8)])
def test_model_gptq_lower_kl_than_rtn(arch, bits, act_order, margin):
    # Held out = windows of the pattern the model learned (its own distribution), calibrated
    # on random tokens. On this toy the default (dynamic-group) GPTQ gains 12-50% KL over
    # RTN depending on the calibration draw; act-order with static groups 25-50%. Held-out
    # *random* tokens are a poor yardstick here: at 3 bits their KL is ~0.003 and the
    # ratio swings from 0.6 to 1.7 between variants.
    model = trained(arch)
    calib = torch.randint(0, VOCAB, (32, 64), generator=torch.Generator().manual_seed(5))
    held_out = pattern(8, 64, 20_000)
    plan = dict(layer_bits=(bits, bits), group_size=32)
    g = gptq_quantize_model(model, BitPlan(method="gptq", **plan), calib, progress=False, act_order=act_order)
    r = quantize_model(model, BitPlan(**plan), progress=False)
    kl_g = compare(fake_quantize(model, g), model, held_out, progress=False)["kl"]
    kl_r = compare(fake_quantize(model, r), model, held_out, progress=False)["kl"]
    assert kl_g < margin * kl_r, (kl_g, kl_r)


def test_act_order_applies_to_group_wise_widths_only():
    # 8-bit is one group per row: act-order would change no layout, and it measured worse
    # on validation text there, so per-channel tensors are quantized in natural order.
    model = tiny_model("llama", layers=2)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))

    def codes(bits, act_order):
        plan = BitPlan((bits, bits), 32, method="gptq")
        return gptq_quantize_model(model, plan, calib, progress=False, act_order=act_order)

    on, off = codes(8, True), codes(8, False)
    assert all(on[k].equal(off[k]) for k in on)
    on, off = codes(4, True), codes(4, False)
    assert any(not on[k].equal(off[k]) for k in on if on[k].bits == 4)
