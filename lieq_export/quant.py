"""The one quantized-weight type, and round-to-nearest quantization into it.

Every quantizer (RTN, GPTQ) produces a `QuantizedWeight`; every exporter serializes
one unchanged. Codes and zero points are *signed* integers in the width's range, so
they map one-to-one onto torchao's `IntxUnpackedToInt8Tensor` (int8 qdata + int8
zero point) and onto ONNX `DequantizeLinear` with INT2/INT4/INT8 initializers.

Scales are rounded to bfloat16-representable values (kept in float32): XNNPACK stores
4-bit block scales as bf16, so a float32 scale would be rounded again on device and
the `.pte` would no longer compute the reference function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WIDTHS = (2, 3, 4, 8)
# Smallest scale: an all-zero group still gets a finite, invertible step.
TINY = 1e-12


class QuantizationError(ValueError):
    pass


def code_range(bits: int) -> tuple[int, int]:
    if bits not in WIDTHS:
        raise QuantizationError(f"bits={bits} is not supported; choose one of {WIDTHS}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    codes: torch.Tensor  # int8 [out, in], in code_range(bits)
    scales: torch.Tensor  # float32 [out, in // group_size]
    zero_points: torch.Tensor | None  # int8 like scales, in code_range(bits); None: symmetric
    bits: int
    group_size: int  # == in_features: one scale per output channel

    def __post_init__(self):
        lo, hi = code_range(self.bits)
        out_f, in_f = self.codes.shape
        if self.codes.dtype != torch.int8:
            raise QuantizationError(f"codes must be int8, got {self.codes.dtype}")
        if in_f % self.group_size:
            raise QuantizationError(f"group_size {self.group_size} does not divide in_features {in_f}")
        expect = (out_f, in_f // self.group_size)
        if tuple(self.scales.shape) != expect:
            raise QuantizationError(f"scales shape {tuple(self.scales.shape)} != {expect}")
        if self.zero_points is not None and tuple(self.zero_points.shape) != expect:
            raise QuantizationError(f"zero_points shape {tuple(self.zero_points.shape)} != {expect}")
        if self.codes.numel() and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise QuantizationError(f"codes outside the {self.bits}-bit range [{lo}, {hi}]")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def centered_codes(self) -> torch.Tensor:
        """codes - zero_point (int16): the same grid written symmetrically.

        For 2- and 3-bit codes it lies in [-3, 3] and [-7, 7], inside int4, which is how
        backends without a 2/3-bit type store those layers without changing the function.
        """
        if self.zero_points is None:
            return self.codes.to(torch.int16)
        zp = self.zero_points.repeat_interleave(self.group_size, dim=1)
        return self.codes.to(torch.int16) - zp

    def dequantize(self) -> torch.Tensor:
        scale = self.scales.repeat_interleave(self.group_size, dim=1)
        return self.centered_codes().to(torch.float32) * scale

    def equal(self, other: "QuantizedWeight") -> bool:
        same_zp = (self.zero_points is None and other.zero_points is None) or (
            self.zero_points is not None
            and other.zero_points is not None
            and torch.equal(self.zero_points, other.zero_points)
        )
        return (
            self.bits == other.bits
            and self.group_size == other.group_size
            and torch.equal(self.codes, other.codes)
            and torch.equal(self.scales, other.scales)
            and same_zp
        )


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16-representable float32 >= x, for positive finite x.

    Rounding a scale *up* keeps the grid covering the group's range, which is what
    bounds the error by half a step; round-to-nearest could shrink it.
    """
    bits = x.float().contiguous().view(torch.int32)
    low = bits & 0xFFFF
    up = torch.where(low != 0, (bits | 0xFFFF) + 1, bits)
    return up.view(torch.float32)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise QuantizationError(
            f"group_size {group_size} does not divide the input width {in_features}; "
            f"choose a divisor of {in_features} (e.g. 32, 64 or 128 where they divide it)"
        )


def grid_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) per row of `w` [rows, group] so the grid covers every value.

    The asymmetric range is widened to include 0 so the integer zero point stays inside
    the code range; that keeps every value within half a step of the grid.
    """
    lo, hi = code_range(bits)
    w = w.float()
    if symmetric:
        # The negative end (lo) is one step longer; mapping |w|max onto -lo would clip
        # positives, so scale by the positive end and let -lo stay a spare code.
        scale = bf16_ceil(w.abs().amax(dim=1).clamp_min(TINY) / hi)
        return scale, None
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    scale = bf16_ceil(((wmax - wmin) / (hi - lo)).clamp_min(TINY))
    zp = (lo - torch.round(wmin / scale)).clamp(lo, hi)
    return scale, zp


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of `w` [rows, group] on the grid given per row."""
    lo, hi = code_range(bits)
    q = torch.round(w.float() / scale[:, None])
    if zp is not None:
        q = q + zp[:, None]
    return q.clamp(lo, hi)


def _rtn_groups(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(codes [groups, group_size] as float, scale, zero point) of round-to-nearest."""
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    code_range(bits)
    check_group_size(weight.shape[1], group_size)
    groups = weight.detach().float().reshape(-1, group_size)
    scale, zp = grid_params(groups, bits, symmetric)
    return round_to_grid(groups, scale, zp, bits), scale, zp


def rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """quantize_rtn(...).dequantize(), bit for bit, without building the codes: for scorers
    that round every layer at several widths and only need the rounded weight."""
    q, scale, zp = _rtn_groups(weight, bits, group_size, symmetric)
    if zp is not None:
        q = q - zp[:, None]  # small integers in float32: exact, as the int16 path is
    return (q * scale[:, None]).reshape(weight.shape)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest, one scale (and zero point) per `group_size` consecutive inputs."""
    codes, scale, zp = _rtn_groups(weight, bits, group_size, symmetric)
    out_f, in_f = weight.shape
    n_groups = in_f // group_size
    return QuantizedWeight(
        codes=codes.to(torch.int8).reshape(out_f, in_f),
        scales=scale.reshape(out_f, n_groups).contiguous(),
        zero_points=None if zp is None else zp.to(torch.int8).reshape(out_f, n_groups),
        bits=bits,
        group_size=group_size,
    )
