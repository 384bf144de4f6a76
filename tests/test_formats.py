"""plan --format: llama.cpp / GPTQModel / AutoRound renderings checked against their documented syntax."""

import json
import re
import shlex

import pytest

from lieq_export.formats import autoround_layer_config, gptqmodel_dynamic, llama_cpp_args, render
from lieq_export.models import PROJECTIONS, LayerSpec, LinearSpec, ModelLayout, describe
from lieq_export.plan import BitPlan
from tests.conftest import tiny_model

# ggml-org/llama.cpp tools/quantize/quantize.cpp, parse_tensor_type: "--tensor-type TENSOR=TYPE",
# split at the first '='; TENSOR is a std::regex searched in the tensor name (README: "Supports
# regex syntax"); TYPE a ggml type name (case-insensitive).
TENSOR_TYPE = re.compile(r"^(?P<pattern>[^=]+)=(?P<type>[a-z0-9_]+)$")
GGML_TYPES = {"q2_k", "q3_k", "q4_k", "q4_0", "q4_1", "q8_0"}
# ModelCloud/GPTQModel README "dynamic": "+:" positive / "-:" negative regex keys.
GPTQ_KEY = re.compile(r"^(?P<sign>[+-]):(?P<regex>.+)$")
GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
        "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def layout():
    return describe(tiny_model("llama", layers=3))


def hand_layout(hidden=256, inter=512, layers=2, tied=False):
    def layer(i):
        dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden // 2), "v_proj": (hidden, hidden // 2),
                "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                "down_proj": (inter, hidden)}
        return LayerSpec(i, tuple(LinearSpec(n, f"model.layers.{i}.{PROJECTIONS[n]}", *dims[n]) for n in PROJECTIONS))

    return ModelLayout("LlamaForCausalLM", tuple(layer(i) for i in range(layers)),
                       LinearSpec("embed_tokens", "model.embed_tokens", hidden, 1000),
                       LinearSpec("lm_head", "lm_head", hidden, 1000), tied, hidden, 4, 2, hidden // 4, False, 1000, 0)


def parse_llama(args):
    """{option: [values]} and the positional base type."""
    opts = {}
    it = iter(args[:-1])
    for flag in it:
        assert flag.startswith("--")
        opts.setdefault(flag, []).append(next(it))
    return opts, args[-1]


def gguf_names(layout):
    for layer in layout.layers:
        for s in layer.linears:
            yield layer.index, s, f"blk.{layer.index}.{GGUF[s.name]}.weight"


@pytest.mark.parametrize("bits,sym", [((2, 4, 8), False), ((4, 8, 4), True), ((3, 3, 2), False)])
def test_llama_cpp_covers_every_tensor_once(layout, bits, sym):
    plan = BitPlan(bits, 32, symmetric=sym)
    opts, base = parse_llama(llama_cpp_args(plan, layout))
    assert base in {"Q2_K", "Q3_K_M", "Q4_K_M", "Q8_0"}
    rules = []
    for v in opts["--tensor-type"]:
        m = TENSOR_TYPE.match(v)
        assert m, v
        assert m["type"] in GGML_TYPES
        rules.append((re.compile(m["pattern"]), m["type"]))  # std::regex ECMAScript ⊂ what re accepts here
    for i, spec, name in gguf_names(layout):
        hits = [t for rx, t in rules if rx.search(name)]
        assert len(hits) == 1, (name, hits)
        b = plan.layer_bits[i]
        # tiny rows (64/128) are no multiple of 256: 32-block types only; 8 bits stays q8_0
        assert hits[0] == ("q8_0" if b == 8 else ("q4_0" if sym else "q4_1")), (name, hits)
    # the overrides touch nothing else a model has
    for other in ("token_embd.weight", "output.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight"):
        assert not [t for rx, t in rules if rx.search(other)], other
    assert opts["--token-embedding-type"] == ["q8_0"]
    assert "--output-tensor-type" not in opts  # tied: GGUF has no output.weight


def test_llama_cpp_float_tables_are_left_out(layout):
    opts, _ = parse_llama(llama_cpp_args(BitPlan((4, 4, 4), 32, embed_bits=None, lm_head_bits=None), layout))
    assert "--token-embedding-type" not in opts and "--output-tensor-type" not in opts


def test_llama_cpp_exact_small_case():
    lay = hand_layout()
    plan = BitPlan((4, 2), 128, symmetric=False, embed_bits=8, lm_head_bits=4)
    assert llama_cpp_args(plan, lay) == [
        "--tensor-type", r"^blk\.0\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$=q4_k",
        "--tensor-type", r"^blk\.1\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$=q2_k",
        "--token-embedding-type", "q8_0",
        "--output-tensor-type", "q4_k",
        "Q4_K_M",
    ]
    text = render("llama.cpp", plan, lay)
    words = shlex.split(text)
    assert words[0] == "llama-quantize" and words[-3:] == ["MODEL-F32.gguf", "OUT.gguf", "Q4_K_M"]
    # 576-wide rows (SmolLM2) cannot hold k-quants: 32-block types, split within a layer
    odd = hand_layout(hidden=576, inter=1536, layers=1)
    assert llama_cpp_args(BitPlan((3,), 64, symmetric=True, embed_bits=None, lm_head_bits=None), odd) == [
        "--tensor-type", r"^blk\.0\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up)\.weight$=q4_0",
        "--tensor-type", r"^blk\.0\.ffn_down\.weight$=q3_k",
        "Q3_K_M",
    ]


def test_gptqmodel_dynamic(layout):
    plan = BitPlan((4, 8, 4), 32, symmetric=True, method="gptq")
    cfg = gptqmodel_dynamic(plan, layout)
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 32, True, True)
    assert cfg["lm_head"] is False  # tied
    rules = []
    for k, v in cfg["dynamic"].items():
        m = GPTQ_KEY.match(k)
        assert m and m["sign"] == "+", k
        assert set(v) <= {"bits", "group_size", "sym", "desc_act"}
        rules.append((re.compile(m["regex"]), v))
    for layer, bits in zip(layout.layers, plan.layer_bits):
        for s in layer.linears:
            hits = [v for rx, v in rules if rx.match(s.path)]
            got = hits[0] if hits else {"bits": cfg["bits"], "group_size": cfg["group_size"]}
            assert len(hits) <= 1
            assert got["bits"] == bits and got["group_size"] == (-1 if bits == 8 else 32), s.path
    assert "embed_tokens" in " ".join(cfg["_unrepresented"])
    json.loads(render("gptqmodel", plan, layout))


def test_gptqmodel_exact_small_case():
    plan = BitPlan((4, 8), 128, symmetric=False, method="rtn", embed_bits=None, lm_head_bits=8)
    assert gptqmodel_dynamic(plan, hand_layout()) == {
        "bits": 8, "group_size": -1, "sym": False, "desc_act": False, "lm_head": True,
        "dynamic": {r"+:^model\.layers\.0\..*": {"bits": 4, "group_size": 128},
                    r"+:^lm_head$": {"bits": 8, "group_size": -1}},
    }


def test_autoround_layer_config(layout):
    plan = BitPlan((2, 4, 8), 32, symmetric=False, lm_head_bits=None)
    cfg = autoround_layer_config(plan, layout)
    names = {s.path for s in layout.linears()}
    assert set(cfg) == names  # tied + float lm_head: decoder linears only
    for layer, bits in zip(layout.layers, plan.layer_bits):
        for s in layer.linears:
            assert cfg[s.path] == {"bits": bits, "group_size": -1 if bits == 8 else 32, "sym": False}
    small = autoround_layer_config(BitPlan((4,), 64, symmetric=True), hand_layout(layers=1))
    assert small["model.layers.0.mlp.down_proj"] == {"bits": 4, "group_size": 64, "sym": True}
    assert small["lm_head"] == {"bits": 8, "group_size": -1, "sym": True}
    assert len(small) == 8


def test_cli_plan_format(layout, tmp_path, capsys):
    from lieq_export import cli
    from lieq_export.models import layout_to_dict
    from lieq_export.scoring import SCORES_SCHEMA

    scores = {"schema_version": SCORES_SCHEMA, "scorer": "lieq", "scores": [1.0, 2.0, 3.0],
              "layer_params": [l.params for l in layout.layers], "layout": layout_to_dict(layout)}
    (tmp_path / "s.json").write_text(json.dumps(scores))
    argv = ["plan", str(tmp_path / "s.json"), "--widths", "4,8", "--avg-bits", "4", "--allocator", "uniform",
            "--group-size", "32", "--out", str(tmp_path / "p.json")]
    assert cli.main(argv + ["--format", "autoround", "--format-out", str(tmp_path / "ar.json")]) == 0
    cfg = json.loads((tmp_path / "ar.json").read_text())
    assert cfg == autoround_layer_config(BitPlan.load(tmp_path / "p.json"), layout)
    assert cli.main(argv + ["--format", "llama.cpp"]) == 0
    assert "llama-quantize --tensor-type" in capsys.readouterr().out
