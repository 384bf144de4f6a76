"""The bit plan: one width per decoder layer, and what it costs on each backend.

Widths are uniform inside a decoder layer and mixed across layers. 8-bit linears are
quantized per output channel (one scale per row): that is the only 8-bit layout
XNNPACK stores, and at 8 bits groups buy nothing measurable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .models import LinearSpec, ModelLayout
from .quant import WIDTHS

SCHEMA_VERSION = 1
METHODS = ("rtn", "gptq")
TABLE_WIDTHS = (4, 8)  # embedding / lm_head widths the backends' kernels take
GROUP_CANDIDATES = (128, 64, 32)


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Storage:
    """How a backend lays out quantized weights on disk."""

    container: dict  # grid bits -> bits stored per weight
    scale_bytes: int
    zero_points: bool  # stores per-group zero points when the plan is asymmetric
    shares_tied_head: bool  # a tied lm_head reuses the embedding's bytes


# XNNPACK has no 2/3-bit type: those codes travel in its 4-bit container (exactly,
# as codes - zero_point) with bf16 block scales. ONNX has INT2 but no INT3.
STORAGE = {
    "pte": Storage(container={2: 4, 3: 4, 4: 4, 8: 8}, scale_bytes=2, zero_points=False, shares_tied_head=False),
    "onnx": Storage(container={2: 2, 3: 4, 4: 4, 8: 8}, scale_bytes=4, zero_points=True, shares_tied_head=False),
}


def default_group_size(layout: ModelLayout) -> int:
    """Largest of 128, 64, 32 dividing every quantized linear's input width."""
    widths = {l.in_features for l in layout.linears()} | {layout.embed.in_features, layout.lm_head.in_features}
    for g in GROUP_CANDIDATES:
        if all(w % g == 0 for w in widths):
            return g
    raise PlanError(f"none of {GROUP_CANDIDATES} divides every input width {sorted(widths)}; pass --group-size")


def check_budget(widths, budget: float) -> None:
    lo, hi = min(widths), max(widths)
    if not lo <= budget <= hi:
        raise PlanError(
            f"average-bit budget {budget} is outside what widths {sorted(widths)} can give ({lo} to {hi}); "
            "change --avg-bits or --widths"
        )


def grid_group_size(bits: int, in_features: int, group_size: int) -> int:
    """A plan's group size at `bits`: 8-bit tensors get one scale per output channel."""
    return in_features if bits == 8 else group_size


@dataclass(frozen=True)
class BitPlan:
    layer_bits: tuple[int, ...]
    group_size: int
    symmetric: bool = False
    method: str = "rtn"
    # GPTQ visits columns by decreasing Hessian diagonal (with static group grids): on
    # smollm2-135m 3-bit g64 this took PPL 21.8 -> 16.3. Applies to group-wise widths
    # only (8-bit is per channel and runs in natural order). Ignored by RTN.
    act_order: bool = True
    embed_bits: int | None = 8  # None: float32
    lm_head_bits: int | None = 8
    allocator: str = "uniform"  # provenance only: which allocator wrote this plan
    budget: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "layer_bits", tuple(int(b) for b in self.layer_bits))
        bad = sorted({b for b in self.layer_bits if b not in WIDTHS})
        if bad:
            raise PlanError(f"layer widths {bad} are not supported; use {WIDTHS}")
        if not self.layer_bits:
            raise PlanError("a plan needs one width per decoder layer; layer_bits is empty")
        if self.method not in METHODS:
            raise PlanError(f"method {self.method!r} is unknown; use one of {METHODS}")
        for name in ("embed_bits", "lm_head_bits"):
            v = getattr(self, name)
            if v is not None and v not in TABLE_WIDTHS:
                raise PlanError(f"{name}={v} is not supported; use one of {TABLE_WIDTHS} or null for float")
        if self.group_size <= 0 or self.group_size % 8:
            raise PlanError(f"group_size {self.group_size} must be a positive multiple of 8")

    @classmethod
    def uniform(cls, layout: ModelLayout, bits: int, group_size: int | None = None, **kw) -> "BitPlan":
        return cls((bits,) * layout.num_layers, group_size or default_group_size(layout), **kw)

    def group_size_for(self, bits: int, in_features: int) -> int:
        return grid_group_size(bits, in_features, self.group_size)

    def validate(self, layout: ModelLayout) -> None:
        if len(self.layer_bits) != layout.num_layers:
            raise PlanError(
                f"plan has {len(self.layer_bits)} layer widths but the model has {layout.num_layers} decoder layers"
            )
        for spec, bits in self.quantized_tensors(layout):
            g = self.group_size_for(bits, spec.in_features)
            if spec.in_features % g:
                raise PlanError(
                    f"group_size {g} does not divide the input width {spec.in_features} of {spec.path}; "
                    f"use a divisor such as {default_group_size(layout)}"
                )

    def quantized_tensors(self, layout: ModelLayout):
        """(LinearSpec, bits) for every tensor the plan quantizes."""
        for layer, bits in zip(layout.layers, self.layer_bits):
            for spec in layer.linears:
                yield spec, bits
        if self.embed_bits:
            yield layout.embed, self.embed_bits
        if self.lm_head_bits:
            yield layout.lm_head, self.lm_head_bits

    def tensor_bytes(self, spec: LinearSpec, bits: int | None, backend: str) -> float:
        if bits is None:
            return spec.params * 4.0
        st = STORAGE[backend]
        groups = spec.params // self.group_size_for(bits, spec.in_features)
        zp = st.zero_points and not self.symmetric
        return spec.params * st.container[bits] / 8 + groups * (st.scale_bytes + (st.container[bits] / 8 if zp else 0))

    def accounting(self, layout: ModelLayout) -> dict:
        self.validate(layout)
        params = {}
        for layer, bits in zip(layout.layers, self.layer_bits):
            params[bits] = params.get(bits, 0) + layer.params
        total = layout.decoder_linear_params
        out = {
            "decoder_linear_params": total,
            "params_per_width": {str(b): n for b, n in sorted(params.items())},
            "avg_grid_bits": sum(b * n for b, n in params.items()) / total,
            "storage_bits": {},
            "predicted_bytes": {},
        }
        table_params = layout.embed.params + (0 if layout.tied else layout.lm_head.params)
        other = layout.total_params - total - table_params  # norms: stay float32
        for backend, st in STORAGE.items():
            out["storage_bits"][backend] = sum(st.container[b] * n for b, n in params.items()) / total
            nbytes = other * 4.0
            for layer, bits in zip(layout.layers, self.layer_bits):
                nbytes += sum(self.tensor_bytes(s, bits, backend) for s in layer.linears)
            nbytes += self.tensor_bytes(layout.embed, self.embed_bits, backend)
            if not (layout.tied and st.shares_tied_head and self.lm_head_bits == self.embed_bits):
                nbytes += self.tensor_bytes(layout.lm_head, self.lm_head_bits, backend)
            out["predicted_bytes"][backend] = int(round(nbytes))
        return out

    def to_dict(self, layout: ModelLayout | None = None) -> dict:
        d = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        d["layer_bits"] = list(self.layer_bits)
        if layout is not None:
            d["accounting"] = self.accounting(layout)
        return d

    def to_json(self, layout: ModelLayout | None = None) -> str:
        return json.dumps(self.to_dict(layout), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "BitPlan":
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {version!r} is not {SCHEMA_VERSION}; re-create the plan with this version")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"schema_version", "accounting"}
        if unknown:
            raise PlanError(f"unknown plan fields {sorted(unknown)}")
        missing = {"layer_bits", "group_size"} - set(d)
        if missing:
            raise PlanError(f"plan is missing {sorted(missing)}")
        if not isinstance(d["layer_bits"], list) or not all(isinstance(b, int) for b in d["layer_bits"]):
            raise PlanError("layer_bits must be a list of integers")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> "BitPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def save(self, path, layout: ModelLayout | None = None) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_json(layout) + "\n")

    @classmethod
    def load(cls, path) -> "BitPlan":
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {path} does not exist")
        return cls.from_json(p.read_text())
