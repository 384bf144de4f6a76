import pytest
import torch

from lieq_export.allocate import allocate
from lieq_export.qerror import QErrorConfig, damage_table, score_qerror
from lieq_export.scoring import ScoreError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def test_qerror_deterministic_monotone_and_one_pass(windows):
    m = tiny_model("llama", layers=3)
    calls = {"model": 0}
    m.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    layer_calls = [0] * 3
    for i, layer in enumerate(m.model.layers):
        layer.register_forward_pre_hook(lambda *a, i=i: layer_calls.__setitem__(i, layer_calls[i] + 1))
    cfg = QErrorConfig(widths=(2, 4), group_size=32, error_tokens=64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = score_qerror(m, windows, cfg, progress=False)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the rounded weights were only borrowed
    # One model-level call captures layer-0 inputs (stopped at layer 0); each layer then runs
    # once in float and once per width: one calibration pass plus one per candidate width.
    assert calls["model"] == 1
    # (layer 0's count includes the capture call, stopped before the layer runs)
    assert layer_calls == [1 + 1 + 2, 1 + 2, 1 + 2]
    b = score_qerror(m, windows, cfg, progress=False)
    assert a["damage"] == b["damage"]
    for d in a["damage"]:
        assert d["2"] > d["4"] > 0
    # only the first error_tokens tokens are read
    other = windows.clone()
    other[1:] = (other[1:] + 1) % 256
    assert score_qerror(m, other, cfg, progress=False)["damage"] == a["damage"]
    assert a["windows"] == [1, 64]


def test_widest_width_extrapolated_costs_one_pass_less(windows):
    m = tiny_model("llama", layers=3)
    layer_calls = [0] * 3
    for i, layer in enumerate(m.model.layers):
        layer.register_forward_pre_hook(lambda *a, i=i: layer_calls.__setitem__(i, layer_calls[i] + 1))
    measured = score_qerror(m, windows, QErrorConfig(widths=(2, 3, 4), group_size=32, error_tokens=64), progress=False)
    layer_calls[:] = [0] * 3
    cfg = QErrorConfig(widths=(2, 3, 4), group_size=32, error_tokens=64, measure_widest=False)
    s = score_qerror(m, windows, cfg, progress=False)
    assert layer_calls == [1 + 1 + 2, 1 + 2, 1 + 2]  # float + 2 and 3 bits; 4 bits not run
    assert s["config"]["measure_widest"] is False
    assert [set(d) for d in s["damage"]] == [{"2", "3"}] * 3
    assert [{b: d[b] for b in ("2", "3")} for d in measured["damage"]] == s["damage"]
    table = damage_table(s, (2, 3, 4))
    assert [t[4] for t in table] == pytest.approx([d["3"] / 4 for d in s["damage"]])
    # one width: nothing to extrapolate from, so it is measured
    assert QErrorConfig(widths=(4,), measure_widest=False).measured_widths == (4,)


def test_local_normalization_divides_by_the_layers_own_output(windows):
    m = tiny_model("llama", layers=3)
    cfg = QErrorConfig(widths=(2,), group_size=32, error_tokens=128, normalize="local")
    local = score_qerror(m, windows, cfg, progress=False)["scores"]
    final = score_qerror(m, windows, QErrorConfig(widths=(2,), group_size=32, error_tokens=128, normalize="final"),
                         progress=False)["scores"]
    # same raw errors, different denominators: the ratio is ‖h_final‖² / ‖h_l‖², 1 at the last layer
    ratios = [lo / fi for lo, fi in zip(local, final)]
    assert ratios[-1] == pytest.approx(1.0)
    assert len({round(r, 6) for r in ratios}) == 3


def test_reader_normalization_weighs_the_stream_by_the_next_norm(windows):
    m = tiny_model("llama", layers=3)

    def scores(normalize):
        cfg = QErrorConfig(widths=(2,), group_size=32, error_tokens=128, normalize=normalize)
        return score_qerror(m, windows, cfg, progress=False)["scores"]

    local, reader = scores("local"), scores("reader")
    assert reader == pytest.approx(local)  # a fresh model's norm weights are all 1
    with torch.no_grad():
        m.model.layers[2].input_layernorm.weight.mul_(3)
    # a uniform weight cancels in layer 1's ratio (layer 2 itself now computes otherwise)
    assert scores("reader")[:2] == pytest.approx(reader[:2])
    with torch.no_grad():
        m.model.layers[2].input_layernorm.weight[::2] = 0
    after_local, after = scores("local"), scores("reader")
    # layer 1's output is unchanged (local equal), but its reader now ignores half the channels
    assert after_local[1] == pytest.approx(local[1])
    assert after[1] != pytest.approx(reader[1], rel=1e-3)
    assert after[0] == pytest.approx(reader[0])


def test_damaged_layer_scores_highest(windows):
    m = tiny_model("qwen3", layers=3)
    with torch.no_grad():  # an outlier-heavy layer: RTN's group range is set by one huge weight
        w = m.model.layers[1].mlp.down_proj.weight
        w[:, ::32] *= 200
    s = score_qerror(m, windows, QErrorConfig(widths=(2, 4), group_size=32), progress=False)
    assert s["scores"][1] > s["scores"][0] and s["scores"][1] > s["scores"][2]
    bits = allocate(s["scores"], s["layer_params"], (2, 4), 2 + 2 / 3, damage=damage_table(s, (2, 4)))
    assert bits == (2, 4, 2)


def test_damage_table_extrapolates_unmeasured_widths():
    t = damage_table({"damage": [{"2": 1.0, "4": 0.0625}]}, (2, 3, 4, 8))
    assert t[0][2] == 1.0 and t[0][4] == 0.0625
    assert t[0][3] == pytest.approx(0.25)  # from 2 bits (nearest, lower on ties)
    assert t[0][8] == pytest.approx(0.0625 / 4**4)


def test_bad_config():
    with pytest.raises(ScoreError, match=r"qerror widths \[5\] are not supported"):
        QErrorConfig(widths=(2, 5))
    with pytest.raises(ScoreError, match="normalize 'mean' is unknown"):
        QErrorConfig(normalize="mean")
    with pytest.raises(ScoreError, match="error_tokens must be positive"):
        QErrorConfig(error_tokens=0)
