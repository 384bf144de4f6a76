import math

import pytest
import torch

from lieq_export.models import describe
from lieq_export.scoring import (
    ALL_PROJECTIONS, ScoreConfig, ScoreError, compactness, delta_ppl, load_scores, save_scores, score_layers,
    spearman, spectrum,
)
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def test_compactness_is_effective_rank():
    z = torch.zeros(100, 8)
    z[:, :3] = torch.randn(100, 3)
    z = torch.linalg.qr(z)[0][:, :3] @ torch.eye(3, 8)  # three equal singular values, five zero
    assert compactness(spectrum(z)) == pytest.approx(3.0, rel=1e-6)
    assert compactness(spectrum(torch.randn(4000, 8))) == pytest.approx(8.0, rel=0.05)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_deterministic_per_seed(arch, windows):
    m = tiny_model(arch)
    a = score_layers(m, windows, ScoreConfig(seed=0), progress=False)
    b = score_layers(m, windows, ScoreConfig(seed=0), progress=False)
    c = score_layers(m, windows, ScoreConfig(seed=1), progress=False)
    assert a["scores"] == b["scores"]
    assert a["scores"] != c["scores"]
    assert len(a["scores"]) == 3 and all(math.isfinite(s) for s in a["scores"])
    assert a["model_fingerprint"] == b["model_fingerprint"] and a["text_fingerprint"] == b["text_fingerprint"]


@pytest.mark.parametrize("cfg", [ScoreConfig(baseline="random_model"), ScoreConfig(projections=ALL_PROJECTIONS),
                                 ScoreConfig(normalize_rows=True)])
def test_score_variants_run_and_are_deterministic(cfg, windows):
    m = tiny_model("qwen3")
    a = score_layers(m, windows, cfg, progress=False)
    assert a["scores"] == score_layers(m, windows, cfg, progress=False)["scores"]
    assert set(a["layers"][0]["projections"]) == set(cfg.projections)


def test_low_rank_layer_scores_higher_than_random(windows):
    """Energy packed into few directions is what the proxy rewards."""
    m = tiny_model("llama", layers=3)
    lay = describe(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            w = m.model.layers[1].get_submodule(f"self_attn.{name}").weight
            u = torch.randn(w.shape[0], 2, generator=g)
            v = torch.randn(2, w.shape[1], generator=g)
            w.copy_((u @ v) * 0.02 + 1e-4 * torch.randn(w.shape, generator=g))
    s = score_layers(m, windows, ScoreConfig(), progress=False)["scores"]
    assert s[1] > s[0] and s[1] > s[2]
    assert s[1] > 0.5  # effective rank ≈ 2 against ≈ head_dim for random
    assert lay.num_layers == 3


def test_delta_ppl_flags_a_damaging_layer(windows):
    m = tiny_model("llama", layers=3)
    with torch.no_grad():
        m.model.layers[2].mlp.down_proj.weight.mul_(0)  # layer 2's MLP contributes nothing
        m.model.layers[2].self_attn.o_proj.weight.mul_(0)
        m.model.layers[0].mlp.down_proj.weight.mul_(50)  # layer 0 dominates the residual stream
    d = delta_ppl(m, windows, progress=False)
    assert abs(d["scores"][2]) < 1e-6
    assert abs(d["scores"][0]) > abs(d["scores"][1])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 1, 2, 3]) == pytest.approx(1.0)
    with pytest.raises(ScoreError, match="equal length"):
        spearman([1, 2, 3], [1, 2])


def test_bad_score_inputs(tmp_path):
    with pytest.raises(ScoreError, match=r"unknown projections \['x_proj'\]"):
        ScoreConfig(projections=("x_proj",))
    with pytest.raises(ScoreError, match="baseline 'zeros' is unknown"):
        ScoreConfig(baseline="zeros")
    with pytest.raises(ScoreError, match="does not exist; create it with `lieq-export score`"):
        load_scores(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"schema_version": 1}')
    with pytest.raises(ScoreError, match="is not a lieq-export scores file"):
        load_scores(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ScoreError, match="not valid JSON"):
        load_scores(tmp_path / "junk.json")


def test_scores_file_round_trip(tmp_path, windows):
    s = score_layers(tiny_model("llama"), windows, progress=False)
    save_scores(tmp_path / "s.json", s)
    assert load_scores(tmp_path / "s.json")["scores"] == s["scores"]
