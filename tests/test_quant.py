import pytest
import torch
from hypothesis import given, settings, strategies as st

from lieq_export.quant import QuantizationError, QuantizedWeight, code_range, quantize_rtn, rtn_dequantized


@st.composite
def weights(draw):
    out_f = draw(st.integers(1, 8))
    groups = draw(st.integers(1, 4))
    group = draw(st.sampled_from([8, 16, 32]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -3.0]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, groups * group, generator=g) * scale + offset * scale
    if draw(st.booleans()):
        w[0, :group] = 0.0  # an all-zero group must not divide by zero
    return w, group


@settings(max_examples=150, deadline=None)
@given(weights(), st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_rtn_codes_in_range_and_error_within_half_step(wg, bits, symmetric):
    w, group = wg
    q = quantize_rtn(w, bits, group, symmetric)
    lo, hi = code_range(bits)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    if symmetric:
        assert q.zero_points is None
    else:
        assert int(q.zero_points.min()) >= lo and int(q.zero_points.max()) <= hi
    step = q.scales.repeat_interleave(group, dim=1)
    err = (q.dequantize() - w).abs()
    # half a step, plus float32 rounding of w / scale
    assert bool((err <= step * 0.5 * (1 + 1e-5) + w.abs() * 1e-6).all()), float((err / step).max())
    # bf16-representable scales: the XNNPACK backend stores them as bf16
    assert torch.equal(q.scales, q.scales.to(torch.bfloat16).float())


@settings(max_examples=80, deadline=None)
@given(weights(), st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_rtn_dequantized_is_the_dequantized_codes_bit_for_bit(wg, bits, symmetric):
    # qerror scores with the shortcut; plans must not depend on which path rounded
    w, group = wg
    assert torch.equal(rtn_dequantized(w, bits, group, symmetric), quantize_rtn(w, bits, group, symmetric).dequantize())


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_centered_codes_fit_int4(bits):
    w = torch.randn(16, 64) + 0.3
    q = quantize_rtn(w, bits, 32, symmetric=False)
    c = q.centered_codes()
    assert int(c.min()) >= -8 and int(c.max()) <= 7
    torch.testing.assert_close(c.float() * q.scales.repeat_interleave(32, 1), q.dequantize())


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [((quantize_rtn(w, b, 64).dequantize() - w) ** 2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] / 1000


def test_group_size_must_divide_input_width():
    with pytest.raises(QuantizationError, match="group_size 64 does not divide the input width 96"):
        quantize_rtn(torch.randn(4, 96), 4, 64)
    with pytest.raises(QuantizationError, match="group_size 64 does not divide the input width 96"):
        rtn_dequantized(torch.randn(4, 96), 4, 64)  # 384 values would reshape into 6 groups of 64


def test_unsupported_width_rejected():
    with pytest.raises(QuantizationError, match=r"bits=5 is not supported"):
        quantize_rtn(torch.randn(4, 64), 5, 32)


def test_malformed_quantized_weight_rejected():
    codes = torch.full((2, 8), 7, dtype=torch.int8)
    with pytest.raises(QuantizationError, match="outside the 2-bit range"):
        QuantizedWeight(codes, torch.ones(2, 1), None, bits=2, group_size=8)
    with pytest.raises(QuantizationError, match="scales shape"):
        QuantizedWeight(codes.clamp(-2, 1), torch.ones(2, 2), None, bits=2, group_size=8)
