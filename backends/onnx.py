"""ONNX export of a quantized decoder for onnxruntime (and onnxruntime-genai).

Route: the graph is written directly with `onnx.helper`, not traced. Every quantized
linear becomes a blockwise `DequantizeLinear` over a constant INT2 / INT4 / INT8
initializer feeding a plain `MatMul`; onnxruntime's level-2 optimizer fuses each pair
into `MatMulNBits` (2, 4 and 8 bits on CPU). The initializers hold the checkpoint's
own codes, scales and zero points, transposed to MatMul's B = [in, out] layout and bit
packed, nothing else: 3-bit codes travel in INT4 (ONNX has no INT3), 2-bit codes in
INT2 (opset 25), so a 2-bit layer takes 2 bits per weight on disk.

Quantized embedding tables use the contrib op `com.microsoft.GatherBlockQuantized`
(a DequantizeLinear -> Gather pair would dequantize the whole table on every step;
onnxruntime does not fuse that pair). 4-bit tables keep their INT4 codes; 8-bit
tables go in as UINT8 (code + 128, zero point + 128: the same grid, relabelled),
because the op has no INT8 input. The op needs a power-of-two block of at least 16;
per-row scales over a width that is not one are repeated per sub-block (same values).

Inputs/outputs follow onnxruntime-genai's decoder naming:
  input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
  past_key_values.N.key / .value [B, kv_heads, P, head_dim] float32
  -> logits [B, S, vocab] float32, present.N.key / .value [B, kv_heads, P+S, head_dim]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# torch is imported where the export needs it: running a bundle (OnnxDecoder, generate)
# needs only numpy and onnxruntime, which keeps a gateway's memory footprint honest.

OPSET = 25  # INT2 in DequantizeLinear needs opset 25
IR_VERSION = 11
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
EXTERNAL_MIN_BYTES = 1024
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
GENAI_CONFIG_FILE = "genai_config.json"
DEFAULT_MAX_LENGTH = 2048
# onnxruntime's DQ->MatMul fusion makes MatMulNBits with accuracy_level 4 (int8 activations)
# unless told otherwise; on SmolLM2 that moves logits by 7 % (8-bit weights) to 50 % (2-bit)
# relative to the reference. Bundles ask for float32 compute (1); generate/bench can override.
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
DEFAULT_ACCURACY_LEVEL = 1
# storage container per grid width: ONNX has INT2, INT4, INT8 but no INT3
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}


class OnnxExportError(ValueError):  # the CLI reports ValueError/OSError as clean errors
    pass


def _onnx():
    import onnx

    return onnx


# ---------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------


def pack_signed(codes: np.ndarray, bits: int) -> bytes:
    """Pack signed integer codes (row-major) into ONNX's little-endian sub-byte layout.

    Element i sits in bits [bits*(i % per), bits*(i % per + 1)) of byte i // per, two's
    complement; a partial last byte is zero padded (what onnx.numpy_helper does).
    """
    flat = np.ascontiguousarray(codes).reshape(-1).astype(np.int16)
    if bits == 8:
        return flat.astype(np.int8).tobytes()
    per = 8 // bits
    mask = (1 << bits) - 1
    u = (flat & mask).astype(np.uint8)
    pad = (-u.size) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    out = np.zeros(u.shape[0], np.uint8)
    for j in range(per):
        out |= u[:, j] << np.uint8(bits * j)
    return out.tobytes()


def unpack_signed(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_signed: int8 array of `count` codes."""
    raw = np.frombuffer(data, np.uint8)
    if bits == 8:
        return raw.view(np.int8)[:count].copy()
    per = 8 // bits
    mask = (1 << bits) - 1
    vals = np.stack([(raw >> np.uint8(bits * j)) & np.uint8(mask) for j in range(per)], axis=1).reshape(-1)[:count]
    vals = vals.astype(np.int8)
    return np.where(vals >= (1 << (bits - 1)), vals - (1 << bits), vals).astype(np.int8)


_ONNX_INT = {2: "INT2", 4: "INT4", 8: "INT8"}


@dataclass
class _Tensor:
    name: str
    data_type: int
    dims: list
    raw: bytes


class GraphBuilder:
    """Tiny helper over onnx.helper: unique names, initializers as raw bytes."""

    def __init__(self):
        self.nodes = []
        self.tensors: list[_Tensor] = []
        self._names: set[str] = set()
        self._consts: dict = {}
        self._n = 0

    def _fresh(self, base: str) -> str:
        self._n += 1
        return f"/{base}_{self._n}"

    def op(self, op_type: str, inputs, outputs=1, name: str | None = None, domain: str = "", **attrs):
        from onnx import helper

        base = name or op_type
        if isinstance(outputs, int):
            outs = [self._fresh(f"{base}/out{i}" if outputs > 1 else f"{base}/out") for i in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self._fresh(base), domain=domain or None, **attrs)
        )
        return outs[0] if len(outs) == 1 else outs

    def add_tensor(self, name: str, data_type: int, dims, raw: bytes) -> str:
        if name in self._names:
            raise OnnxExportError(f"duplicate initializer {name}")
        self._names.add(name)
        self.tensors.append(_Tensor(name, data_type, [int(d) for d in dims], raw))
        return name

    def add_array(self, name: str, arr: np.ndarray) -> str:
        from onnx import helper

        arr = np.array(arr, order="C", copy=True)  # ascontiguousarray would turn a scalar into [1]
        dt = helper.np_dtype_to_tensor_dtype(arr.dtype)
        return self.add_tensor(name, dt, arr.shape, arr.tobytes())

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add_array(f"const_{len(self._consts)}", arr)
        return self._consts[key]


# ---------------------------------------------------------------------------
# the decoder graph
# ---------------------------------------------------------------------------


@dataclass
class LinearRecord:
    path: str
    grid_bits: int | None  # None: float32
    storage_bits: int  # bits per weight on disk for the codes (32 for float)
    group_size: int | None
    in_features: int
    out_features: int
    op: str  # MatMul or GatherBlockQuantized or Gather
    bytes: int = 0  # bytes of this tensor's initializers (codes + scales + zero points)


@dataclass
class ExportInfo:
    records: list = field(default_factory=list)

    def add(self, rec: LinearRecord):
        self.records.append(rec)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _pow2_block(n: int) -> int | None:
    """Largest power of two >= 16 dividing n, or None."""
    b = 1
    while n % (b * 2) == 0:
        b *= 2
    return b if b >= 16 else None


class DecoderExporter:
    def __init__(self, model, qweights: dict, layout):
        self.model = model
        self.q = dict(qweights or {})
        self.layout = layout
        self.cfg = model.config
        self.g = GraphBuilder()
        self.info = ExportInfo()
        self._check_supported()

    # -- checks -------------------------------------------------------------
    def _check_supported(self):
        cfg = self.cfg
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise OnnxExportError(f"hidden_act {act!r} is not supported by the ONNX exporter (only silu)")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise OnnxExportError("sliding-window attention is not supported by the ONNX exporter")
        rope = getattr(cfg, "rope_scaling", None) or {}
        rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rtype in ("dynamic", "longrope"):
            raise OnnxExportError(f"rope_scaling type {rtype!r} depends on the sequence length; not supported")
        known = {l.path for l in self.layout.linears()} | {self.layout.embed.path, self.layout.lm_head.path}
        extra = set(self.q) - known
        if extra:
            raise OnnxExportError(f"quantized weights for unknown modules: {sorted(extra)[:5]}")

    # -- weights ------------------------------------------------------------
    def linear(self, x: str, path: str) -> str:
        """x @ W.T (+ b) for the nn.Linear at `path`, quantized when the checkpoint says so."""
        g = self.g
        onnx = _onnx()
        mod = self.model.get_submodule(path)
        out_f, in_f = mod.weight.shape
        qw = self.q.get(path)
        if qw is None:
            w = g.add_array(f"{path}.weight", _np(mod.weight.float()).T.copy())
            self.info.add(LinearRecord(path, None, 32, None, in_f, out_f, "MatMul", in_f * out_f * 4))
            y = g.op("MatMul", [x, w], name=f"{path}/MatMul")
        else:
            if tuple(qw.codes.shape) != (out_f, in_f):
                raise OnnxExportError(f"{path}: quantized shape {tuple(qw.codes.shape)} != module {(out_f, in_f)}")
            cbits = CONTAINER_BITS[qw.bits]
            dtype = getattr(onnx.TensorProto, _ONNX_INT[cbits])
            codes_t = _np(qw.codes).T  # [in, out]
            nbytes = 0
            name = g.add_tensor(f"{path}.weight_q", dtype, [in_f, out_f], pack_signed(codes_t, cbits))
            nbytes += len(g.tensors[-1].raw)
            per_channel = qw.group_size == in_f
            if per_channel:
                scales = _np(qw.scales).reshape(out_f).astype(np.float32)
                zps = None if qw.zero_points is None else _np(qw.zero_points).reshape(out_f)
                attrs = dict(axis=1)
            else:
                block = qw.group_size
                scales = _np(qw.scales).astype(np.float32)  # [out, in/g]
                zps = None if qw.zero_points is None else _np(qw.zero_points)
                if block < 16 or block & (block - 1):
                    # MatMulNBits wants a power-of-two block >= 16: repeat each group's
                    # scale over sub-blocks (identical values, a few more scale bytes).
                    sub = _pow2_block(block)
                    if sub is None:
                        raise OnnxExportError(
                            f"{path}: group_size {block} has no power-of-two sub-block >= 16; "
                            "onnxruntime cannot fuse it into MatMulNBits"
                        )
                    rep = block // sub
                    scales = np.repeat(scales, rep, axis=1)
                    zps = None if zps is None else np.repeat(zps, rep, axis=1)
                    block = sub
                scales = scales.T.copy()  # [in/g, out]
                zps = None if zps is None else zps.T.copy()
                attrs = dict(axis=0, block_size=block)
            s = g.add_tensor(f"{path}.scales", onnx.TensorProto.FLOAT, scales.shape, scales.tobytes())
            nbytes += scales.nbytes
            inputs = [name, s]
            if zps is not None:
                z = g.add_tensor(f"{path}.zero_points", dtype, zps.shape, pack_signed(zps, cbits))
                nbytes += len(g.tensors[-1].raw)
                inputs.append(z)
            wd = g.op("DequantizeLinear", inputs, name=f"{path}/DequantizeLinear", **attrs)
            y = g.op("MatMul", [x, wd], name=f"{path}/MatMul")
            self.info.add(LinearRecord(path, qw.bits, cbits, qw.group_size, in_f, out_f, "MatMul", nbytes))
        if getattr(mod, "bias", None) is not None:
            b = g.add_array(f"{path}.bias", _np(mod.bias.float()))
            y = g.op("Add", [y, b], name=f"{path}/Add")
        return y

    def embedding(self, ids: str) -> str:
        g = self.g
        onnx = _onnx()
        path = self.layout.embed.path
        emb = self.model.get_submodule(path).weight
        vocab, hidden = emb.shape
        qw = self.q.get(path)
        if qw is None:
            w = g.add_array(f"{path}.weight", _np(emb.float()))
            self._float_embed = w
            self.info.add(LinearRecord(path, None, 32, None, hidden, vocab, "Gather", vocab * hidden * 4))
            return g.op("Gather", [w, ids], name=f"{path}/Gather", axis=0)
        if qw.bits not in (2, 3, 4, 8):
            raise OnnxExportError(f"{path}: {qw.bits}-bit embeddings are not supported")
        block = qw.group_size
        scales = _np(qw.scales).astype(np.float32)
        zps = None if qw.zero_points is None else _np(qw.zero_points).astype(np.int16)
        if block < 16 or block & (block - 1):
            sub = _pow2_block(block)
            if sub is None:
                raise OnnxExportError(f"{path}: group_size {block} has no power-of-two sub-block >= 16")
            rep = block // sub
            scales = np.repeat(scales, rep, axis=1)
            zps = None if zps is None else np.repeat(zps, rep, axis=1)
            block = sub
        scales = np.ascontiguousarray(scales)
        codes = _np(qw.codes)
        nbytes = 0
        if qw.bits == 8:
            # GatherBlockQuantized takes UINT8 for 8 bits: shift codes and zero points by 128.
            data = g.add_tensor(f"{path}.weight_q", onnx.TensorProto.UINT8, [vocab, hidden],
                                (codes.astype(np.int16) + 128).astype(np.uint8).tobytes())
            nbytes += vocab * hidden
            zp_u8 = (np.zeros(scales.shape, np.int16) if zps is None else zps) + 128
            z = g.add_tensor(f"{path}.zero_points", onnx.TensorProto.UINT8, list(scales.shape),
                             zp_u8.astype(np.uint8).tobytes())
            nbytes += zp_u8.size
            cbits = 8
        else:
            data = g.add_tensor(f"{path}.weight_q", onnx.TensorProto.INT4, [vocab, hidden], pack_signed(codes, 4))
            nbytes += len(g.tensors[-1].raw)
            z = None
            if zps is not None:
                z = g.add_tensor(f"{path}.zero_points", onnx.TensorProto.INT4, list(scales.shape), pack_signed(zps, 4))
                nbytes += len(g.tensors[-1].raw)
            cbits = 4
        s = g.add_tensor(f"{path}.scales", onnx.TensorProto.FLOAT, list(scales.shape), scales.tobytes())
        nbytes += scales.nbytes
        inputs = [data, ids, s] + ([z] if z else [])
        self.info.add(LinearRecord(path, qw.bits, cbits, qw.group_size, hidden, vocab, "GatherBlockQuantized", nbytes))
        return g.op("GatherBlockQuantized", inputs, name=f"{path}/GatherBlockQuantized", domain=MS_DOMAIN,
                    gather_axis=0, quantize_axis=1, block_size=block, bits=cbits)

    def lm_head(self, x: str) -> str:
        path = self.layout.lm_head.path
        if path not in self.q and self.layout.tied and getattr(self, "_float_embed", None):
            # tied float head: reuse the embedding table (one copy on disk)
            wt = self.g.op("Transpose", [self._float_embed], name=f"{path}/Transpose", perm=[1, 0])
            out_f, in_f = self.model.get_submodule(path).weight.shape
            self.info.add(LinearRecord(path, None, 32, None, in_f, out_f, "MatMul (tied)", 0))
            return self.g.op("MatMul", [x, wt], name=f"{path}/MatMul")
        return self.linear(x, path)

    def rmsnorm(self, x: str, path: str, eps: float) -> str:
        w = self.g.add_array(f"{path}.weight", _np(self.model.get_submodule(path).weight.float()))
        return self.g.op("RMSNormalization", [x, w], name=f"{path}/RMSNorm", axis=-1, epsilon=float(eps))

    # -- graph --------------------------------------------------------------
    def build(self):
        onnx = _onnx()
        from onnx import TensorProto as TP, helper

        g, cfg, L = self.g, self.cfg, self.layout
        n_layers = L.num_layers
        nh, nkv, hd = L.num_heads, L.num_kv_heads, L.head_dim
        n_rep = nh // nkv
        eps = float(cfg.rms_norm_eps)
        C = g.const

        inputs = [
            helper.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TP.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch_size", "sequence_length", L.vocab_size])]
        for i in range(n_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TP.FLOAT, ["batch_size", nkv, "past_sequence_length", hd]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TP.FLOAT, ["batch_size", nkv, "total_sequence_length", hd]))

        x = self.embedding("input_ids")

        # rotary tables from position_ids: [B, 1, S, hd]
        rot = self.model.model.rotary_emb
        inv_freq = _np(rot.inv_freq.float())
        att_scale = float(getattr(rot, "attention_scaling", 1.0))
        inv = g.add_array("rotary.inv_freq", inv_freq.reshape(1, 1, -1).astype(np.float32))
        pos = g.op("Cast", ["position_ids"], name="rotary/Cast", to=TP.FLOAT)
        pos = g.op("Unsqueeze", [pos, C([2])], name="rotary/Unsqueeze")
        freqs = g.op("Mul", [pos, inv], name="rotary/Mul")  # [B,S,hd/2]
        embf = g.op("Concat", [freqs, freqs], name="rotary/Concat", axis=-1)
        cos = g.op("Cos", [embf], name="rotary/Cos")
        sin = g.op("Sin", [embf], name="rotary/Sin")
        if att_scale != 1.0:
            cos = g.op("Mul", [cos, C(att_scale, np.float32)], name="rotary/ScaleCos")
            sin = g.op("Mul", [sin, C(att_scale, np.float32)], name="rotary/ScaleSin")
        cos = g.op("Unsqueeze", [cos, C([1])], name="rotary/cos")
        sin = g.op("Unsqueeze", [sin, C([1])], name="rotary/sin")

        # mask [B, 1, 1, S, T]: key j visible to query i iff j <= past + i and attention_mask[b, j]
        shape_ids = g.op("Shape", ["input_ids"], name="mask/ShapeIds")
        seq = g.op("Gather", [shape_ids, C(1)], name="mask/Seq", axis=0)
        shape_am = g.op("Shape", ["attention_mask"], name="mask/ShapeAm")
        total = g.op("Gather", [shape_am, C(1)], name="mask/Total", axis=0)
        past = g.op("Sub", [total, seq], name="mask/Past")
        q_pos = g.op("Range", [past, total, C(1)], name="mask/QPos")
        k_pos = g.op("Range", [C(0), total, C(1)], name="mask/KPos")
        q_pos = g.op("Unsqueeze", [q_pos, C([1])], name="mask/QPosU")  # [S,1]
        causal = g.op("LessOrEqual", [k_pos, q_pos], name="mask/Causal")  # [S,T]
        am = g.op("Cast", ["attention_mask"], name="mask/AmBool", to=TP.BOOL)
        am = g.op("Unsqueeze", [am, C([1, 2, 3])], name="mask/AmU")  # [B,1,1,1,T]
        mask = g.op("And", [causal, am], name="mask/And")  # [B,1,1,S,T]
        neg = C(np.finfo(np.float32).min, np.float32)

        scaling = float(hd) ** -0.5
        half = hd // 2
        batch = g.op("Gather", [shape_ids, C(0)], name="shape/Batch", axis=0)
        b1 = g.op("Unsqueeze", [batch, C([0])], name="shape/B1")
        s1 = g.op("Unsqueeze", [seq, C([0])], name="shape/S1")
        shp_q = g.op("Concat", [b1, s1, C([nh, hd])], name="shape/Q", axis=0)
        shp_kv = g.op("Concat", [b1, s1, C([nkv, hd])], name="shape/KV", axis=0)
        shp_q5 = g.op("Concat", [b1, C([nkv, n_rep]), s1, C([hd])], name="shape/Q5", axis=0)
        shp_out = g.op("Concat", [b1, s1, C([nh * hd])], name="shape/Out", axis=0)

        def rope(t, tag):
            x1 = g.op("Slice", [t, C([0]), C([half]), C([-1])], name=f"{tag}/Slice1")
            x2 = g.op("Slice", [t, C([half]), C([hd]), C([-1])], name=f"{tag}/Slice2")
            rh = g.op("Concat", [g.op("Neg", [x2], name=f"{tag}/Neg"), x1], name=f"{tag}/RotHalf", axis=-1)
            return g.op("Add", [g.op("Mul", [t, cos], name=f"{tag}/MulCos"),
                               g.op("Mul", [rh, sin], name=f"{tag}/MulSin")], name=f"{tag}/Add")

        for i in range(n_layers):
            p = f"model.layers.{i}"
            h = self.rmsnorm(x, f"{p}.input_layernorm", eps)
            q = self.linear(h, f"{p}.self_attn.q_proj")
            k = self.linear(h, f"{p}.self_attn.k_proj")
            v = self.linear(h, f"{p}.self_attn.v_proj")
            q = g.op("Reshape", [q, shp_q], name=f"{p}/q/Reshape")  # [B,S,nh,hd]
            k = g.op("Reshape", [k, shp_kv], name=f"{p}/k/Reshape")
            v = g.op("Reshape", [v, shp_kv], name=f"{p}/v/Reshape")
            if L.qk_norm:
                q = self.rmsnorm(q, f"{p}.self_attn.q_norm", eps)
                k = self.rmsnorm(k, f"{p}.self_attn.k_norm", eps)
            q = g.op("Transpose", [q], name=f"{p}/q/Transpose", perm=[0, 2, 1, 3])  # [B,nh,S,hd]
            k = g.op("Transpose", [k], name=f"{p}/k/Transpose", perm=[0, 2, 1, 3])
            v = g.op("Transpose", [v], name=f"{p}/v/Transpose", perm=[0, 2, 1, 3])
            q = rope(q, f"{p}/q/rope")
            k = rope(k, f"{p}/k/rope")
            k_all = g.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], name=f"{p}/k/Concat", axis=2)
            v_all = g.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], name=f"{p}/v/Concat", axis=2)
            # grouped-query attention without copying K/V: [B,kv,rep,S,hd] @ [B,kv,1,hd,T]
            q5 = g.op("Reshape", [q, shp_q5], name=f"{p}/q/Reshape5")
            q5 = g.op("Mul", [q5, C(scaling, np.float32)], name=f"{p}/q/Scale")
            k5 = g.op("Unsqueeze", [k_all, C([2])], name=f"{p}/k/Unsqueeze")
            v5 = g.op("Unsqueeze", [v_all, C([2])], name=f"{p}/v/Unsqueeze")
            kt = g.op("Transpose", [k5], name=f"{p}/k/TransposeT", perm=[0, 1, 2, 4, 3])
            scores = g.op("MatMul", [q5, kt], name=f"{p}/attn/QK")  # [B,kv,rep,S,T]
            scores = g.op("Where", [mask, scores, neg], name=f"{p}/attn/Mask")
            probs = g.op("Softmax", [scores], name=f"{p}/attn/Softmax", axis=-1)
            ctx = g.op("MatMul", [probs, v5], name=f"{p}/attn/PV")  # [B,kv,rep,S,hd]
            ctx = g.op("Reshape", [ctx, C([0, nh, -1, hd])], name=f"{p}/attn/Reshape4")
            ctx = g.op("Transpose", [ctx], name=f"{p}/attn/Transpose", perm=[0, 2, 1, 3])
            ctx = g.op("Reshape", [ctx, shp_out], name=f"{p}/attn/ReshapeOut")
            o = self.linear(ctx, f"{p}.self_attn.o_proj")
            x = g.op("Add", [x, o], name=f"{p}/AddAttn")
            h = self.rmsnorm(x, f"{p}.post_attention_layernorm", eps)
            gate = self.linear(h, f"{p}.mlp.gate_proj")
            up = self.linear(h, f"{p}.mlp.up_proj")
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/Silu")
            act = g.op("Mul", [act, up], name=f"{p}/mlp/MulUp")
            d = self.linear(act, f"{p}.mlp.down_proj")
            x = g.op("Add", [x, d], name=f"{p}/AddMlp")

        x = self.rmsnorm(x, "model.norm", eps)
        logits = self.lm_head(x)
        g.op("Identity", [logits], ["logits"], name="logits/Identity")

        graph = helper.make_graph(g.nodes, "lieq_decoder", inputs, outputs)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="lieq-export",
        )
        model.ir_version = IR_VERSION
        return model


def _write_model(model, tensors: list[_Tensor], folder: Path, external: bool) -> list[str]:
    """Attach initializers (inline or in one external data file) and write model.onnx."""
    onnx = _onnx()
    files = [MODEL_FILE]
    init = model.graph.initializer
    if external:
        data_path = folder / DATA_FILE
        offset = 0
        with open(data_path, "wb") as f:
            for t in tensors:
                if len(t.raw) < EXTERNAL_MIN_BYTES:  # shape constants stay inline for shape inference
                    init.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=t.raw))
                    continue
                # align each tensor to 64 bytes (what onnx's own writer does for mmap)
                pad = (-offset) % 64
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                f.write(t.raw)
                tp = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
                tp.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(t.raw)))):
                    e = tp.external_data.add()
                    e.key, e.value = k, v
                init.append(tp)
                offset += len(t.raw)
        files.append(DATA_FILE)
    else:
        for t in tensors:
            init.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=t.raw))
    with open(folder / MODEL_FILE, "wb") as f:
        f.write(model.SerializeToString())
    onnx.checker.check_model(str(folder / MODEL_FILE))
    return files


# ---------------------------------------------------------------------------
# bundle
# ---------------------------------------------------------------------------


def _genai_config(model, layout, tokenizer, max_length: int, accuracy_level: int) -> dict:
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    eos = getattr(cfg, "eos_token_id", None)
    if tokenizer is not None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else bos
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    mtype = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}.get(layout.architecture, "llama")
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": max_length,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [],
                    ACCURACY_LEVEL_KEY: str(int(accuracy_level)),
                },
                "filename": MODEL_FILE,
                "head_size": layout.head_dim,
                "hidden_size": layout.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": layout.num_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": mtype,
            "vocab_size": layout.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _versions() -> dict:
    import onnx
    import onnxruntime

    import torch

    out = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["lieq-export"] = version("lieq-export")
    except Exception:
        pass
    try:
        import onnxruntime_genai

        out["onnxruntime-genai"] = onnxruntime_genai.__version__
    except Exception:
        pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(
    model,
    qweights: dict,
    out,
    *,
    tokenizer=None,
    plan=None,
    max_length: int | None = None,
    external_data: bool | None = None,
    overwrite: bool = True,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> dict:
    """Write an onnxruntime(-genai) bundle folder at `out`; return its manifest.

    model: the float Hugging Face model (its norms, rotary tables and any float linears
    are taken from it); qweights: {module path: QuantizedWeight} from quantize_model.
    external_data: None = only past the 2 GiB protobuf limit.
    The bundle is built in a temporary sibling folder and renamed into place, so a
    failure leaves no partial bundle behind.
    """
    from lieq_export.io import atomic_dir
    from lieq_export.models import describe

    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OnnxExportError(f"{out} exists; remove it or pass overwrite")
    if out.exists() and not out.is_dir():
        raise OnnxExportError(f"{out} exists and is not a folder")
    layout = describe(model)
    if plan is not None:
        plan.validate(layout)
    max_length = int(max_length or min(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH, 1 << 20))

    import torch

    exporter = DecoderExporter(model, qweights, layout)
    with torch.no_grad():
        proto = exporter.build()
    tensors = exporter.g.tensors
    init_bytes = sum(len(t.raw) for t in tensors)
    if external_data is None:
        external_data = init_bytes > EXTERNAL_DATA_THRESHOLD

    with atomic_dir(out) as tmp:
        files = _write_model(proto, tensors, tmp, external_data)
        del proto
        if tokenizer is not None:
            tok_files = tokenizer.save_pretrained(str(tmp))
            files += sorted({Path(f).name for f in tok_files if Path(f).exists()})
        genai = _genai_config(model, layout, tokenizer, max_length, accuracy_level)
        (tmp / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2) + "\n")
        files.append(GENAI_CONFIG_FILE)
        if plan is not None:
            (tmp / PLAN_FILE).write_text(plan.to_json(layout) + "\n")
            files.append(PLAN_FILE)
        manifest = _manifest(model, layout, exporter.info, plan, tmp, files, genai, external_data, init_bytes)
        manifest["export_seconds"] = round(time.time() - t0, 2)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(model, layout, info: ExportInfo, plan, folder: Path, files, genai, external, init_bytes) -> dict:
    sizes = {f: (folder / f).stat().st_size for f in files}
    onnx_bytes = sizes[MODEL_FILE] + sizes.get(DATA_FILE, 0)
    per_layer = []
    for layer in layout.layers:
        recs = [r for r in info.records if r.path.startswith(f"model.layers.{layer.index}.")]
        grids = sorted({r.grid_bits for r in recs}, key=lambda b: b or 99)
        per_layer.append({
            "layer": layer.index,
            "grid_bits": grids[0] if len(grids) == 1 else grids,
            "storage_bits": sorted({r.storage_bits for r in recs})[0] if len({r.storage_bits for r in recs}) == 1
            else sorted({r.storage_bits for r in recs}),
            "bytes": sum(r.bytes for r in recs),
            "params": layer.params,
        })
    tensors = [
        {"path": r.path, "op": r.op, "grid_bits": r.grid_bits, "storage_bits": r.storage_bits,
         "group_size": r.group_size, "shape": [r.out_features, r.in_features], "bytes": r.bytes}
        for r in info.records
    ]
    quantized_linears = [r.path for r in info.records if r.grid_bits is not None and r.op == "MatMul"]
    m = genai["model"]
    manifest = {
        "format": "lieq-export onnx bundle",
        "schema_version": 1,
        "architecture": layout.architecture,
        "opset": OPSET,
        "files": sizes,
        "onnx_bytes": onnx_bytes,
        "initializer_bytes": init_bytes,
        "external_data": bool(external),
        "vocab_size": layout.vocab_size,
        "bos_token_id": m["bos_token_id"],
        "eos_token_id": m["eos_token_id"],
        "pad_token_id": m["pad_token_id"],
        "max_length": m["context_length"],
        "num_layers": layout.num_layers,
        "accuracy_level": int(genai["model"]["decoder"]["session_options"][ACCURACY_LEVEL_KEY]),
        "layers": per_layer,
        "tensors": tensors,
        "quantized_linears": quantized_linears,
        "storage_note": "3-bit codes are stored in INT4 (ONNX has no INT3); 2-bit in INT2; "
        "8-bit embedding codes as UINT8 = code + 128 (GatherBlockQuantized has no INT8 input)",
        "io": {
            "inputs": ["input_ids", "attention_mask", "position_ids"]
            + [f"past_key_values.{i}.{k}" for i in range(layout.num_layers) for k in ("key", "value")],
            "outputs": ["logits"] + [f"present.{i}.{k}" for i in range(layout.num_layers) for k in ("key", "value")],
        },
        "versions": _versions(),
    }
    if plan is not None:
        acc = plan.accounting(layout)
        pred = acc["predicted_bytes"]["onnx"]
        manifest["predicted_onnx_bytes"] = pred
        manifest["predicted_vs_actual"] = round(onnx_bytes / pred, 4) if pred else None
        manifest["avg_grid_bits"] = acc["avg_grid_bits"]
        manifest["avg_storage_bits"] = acc["storage_bits"]["onnx"]
    return manifest


# ---------------------------------------------------------------------------
# running a bundle with onnxruntime
# ---------------------------------------------------------------------------


def session_options(accuracy_level: int | None = None, threads: int | None = None, optimized_path=None,
                    config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if accuracy_level is not None:
        # accuracy level of the MatMulNBits nodes the DQ->MatMul fusion creates:
        # 0/1 = float32 compute, 4 = int8 activations (faster, slightly less exact)
        so.add_session_config_entry(ACCURACY_LEVEL_KEY, str(int(accuracy_level)))
    if threads:
        so.intra_op_num_threads = int(threads)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


def load_manifest(bundle) -> dict:
    p = Path(bundle) / MANIFEST_FILE
    if not p.is_file():
        raise OnnxExportError(f"{bundle} is not an ONNX bundle: {MANIFEST_FILE} is missing")
    return json.loads(p.read_text())


class OnnxDecoder:
    """A bundle's model.onnx in an onnxruntime session, with a KV cache."""

    def __init__(self, bundle, accuracy_level: int | None = None, threads: int | None = None, optimized_path=None,
                 config: dict | None = None):
        import onnxruntime as ort

        self.bundle = Path(bundle)
        path = self.bundle / MODEL_FILE
        if not path.is_file():
            raise OnnxExportError(f"{bundle} has no {MODEL_FILE}")
        self.manifest = load_manifest(bundle) if (self.bundle / MANIFEST_FILE).is_file() else None
        if accuracy_level is None and self.manifest is not None:
            accuracy_level = self.manifest.get("accuracy_level")  # what the bundle asks for
        self.accuracy_level = accuracy_level
        self.session = ort.InferenceSession(
            str(path), session_options(accuracy_level, threads, optimized_path, config), providers=["CPUExecutionProvider"]
        )
        ins = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for n in ins if n.endswith(".key") and n.startswith("past_key_values."))
        k0 = ins["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(k0[1]), int(k0[3])

    def empty_cache(self, batch: int = 1) -> dict:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(self.num_layers) for k in ("key", "value")}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict):
        """One forward: returns (logits [B,S,V], new cache)."""
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        s = input_ids.shape[1]
        pos = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -s:]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos.astype(np.int64), **cache}
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, outs))
        new = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"], new

    def logits(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        lg, _ = self.step(ids, np.ones_like(ids), self.empty_cache())
        return lg[0]

    def greedy(self, prompt_ids, max_new_tokens: int, eos_token_id=None, on_token=None, top_p=None,
               temperature: float = 1.0, seed=None) -> list[int]:
        """Continue `prompt_ids`: greedy, or nucleus sampling when top_p is given."""
        ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise OnnxExportError("the prompt has no tokens")
        mask = np.ones_like(ids)
        cache = self.empty_cache()
        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        rng = np.random.default_rng(seed)
        out = []
        cur = ids
        for _ in range(max_new_tokens):
            lg, cache = self.step(cur, mask, cache)
            nxt = _pick(lg[0, -1], top_p, temperature, rng)
            out.append(nxt)
            if on_token:
                on_token(nxt)
            if nxt in eos:
                break
            cur = np.array([[nxt]], np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        return out


def _pick(logits: np.ndarray, top_p, temperature: float, rng) -> int:
    if top_p is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / max(float(temperature), 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(rng.choice(keep, p=q))


def generate(bundle, prompt: str, max_new_tokens: int = 64, chat: bool = False, accuracy_level: int | None = None,
             top_p=None, temperature: float = 1.0, seed=None, use_genai: bool = False) -> str:
    """Text continuation of `prompt` with the bundle's model and tokenizer (greedy unless top_p)."""
    from transformers import AutoTokenizer

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    tok = AutoTokenizer.from_pretrained(str(bundle))
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    room = manifest["max_length"] - len(ids)
    if room <= 0:
        raise OnnxExportError(f"the prompt has {len(ids)} tokens; the bundle's max length is {manifest['max_length']}")
    n = min(max_new_tokens, room)
    if use_genai:
        if top_p is not None:
            raise OnnxExportError("--genai runs greedy search only (the bundle's genai_config); drop --top-p")
        new = genai_greedy(bundle, ids, n)
    else:
        dec = OnnxDecoder(bundle, accuracy_level=accuracy_level)
        new = dec.greedy(ids, n, eos_token_id=manifest.get("eos_token_id"), top_p=top_p,
                         temperature=temperature, seed=seed)
    return tok.decode(new, skip_special_tokens=True)


def is_bundle(path) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / MANIFEST_FILE).is_file()


def genai_greedy(bundle, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy continuation with onnxruntime-genai reading the bundle's genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(prompt_ids))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt_ids):]


def count_fused(optimized_model_path) -> dict:
    """Op counts of an onnxruntime-optimized model, and DQ nodes still feeding a MatMul."""
    onnx = _onnx()
    m = onnx.load(str(optimized_model_path), load_external_data=False)
    counts: dict = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    producers = {o: n for n in m.graph.node for o in n.output}
    unfused = [
        n.name for n in m.graph.node
        if n.op_type == "MatMul" and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                         for i in n.input)
    ]
    return {"ops": counts, "unfused_dq_matmul": unfused,
            "matmulnbits": [n.name for n in m.graph.node if n.op_type == "MatMulNBits"]}
