"""score -> plan -> quantize -> eval through the command line, on a tiny local model."""

import json

import pytest
import torch

from lieq_export import cli
from lieq_export.plan import BitPlan
from lieq_export.quantize import load_checkpoint
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", layers=4).save_pretrained(d)
    words = [f"w{i}" for i in range(250)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"<unk>": 250}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, 250, (4000,), generator=g).tolist())
    (d / "text.txt").write_text(text)
    return d


def run(*argv):
    assert cli.main([str(a) for a in argv]) == 0


def test_score_plan_quantize_eval(model_dir, tmp_path, capsys):
    text = model_dir / "text.txt"
    common = ["--text", text, "--seq-len", 64]
    run("score", model_dir, *common, "--scorer", "lieq", "--calib", 4, "--delta-ppl", "--out", tmp_path / "s.json")
    out = capsys.readouterr().out
    assert "Spearman" in out and "scored 4 layers (lieq)" in out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert len(scores["scores"]) == 4 and len(scores["delta_ppl"]["scores"]) == 4

    run("plan", tmp_path / "s.json", "--widths", "2,4", "--avg-bits", 2.5, "--out", tmp_path / "p.json")
    plan = BitPlan.load(tmp_path / "p.json")
    assert sorted(plan.layer_bits) == [2, 2, 2, 4]
    top = max(range(4), key=lambda i: scores["scores"][i])
    assert plan.layer_bits[top] == 4
    assert "average grid bits 2.5000" in capsys.readouterr().out

    run("plan", tmp_path / "s.json", "--widths", "2,4", "--avg-bits", 2.5, "--allocator", "oracle",
        "--out", tmp_path / "o.json")
    oracle = BitPlan.load(tmp_path / "o.json")
    assert oracle.layer_bits[max(range(4), key=lambda i: scores["delta_ppl"]["scores"][i])] == 4

    run("quantize", model_dir, "--plan", tmp_path / "p.json", *common, "--calib", 2, "--eval-windows", 2,
        "--out", tmp_path / "ckpt")
    _, _, plan2, qw = load_checkpoint(tmp_path / "ckpt")
    assert plan2 == plan and qw["model.layers.0.self_attn.q_proj"].bits == plan.layer_bits[0]

    run("eval", model_dir, "--checkpoint", tmp_path / "ckpt", *common, "--calib", 2, "--eval-windows", 4,
        "--json", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["ppl"] > 1 and 0 <= res["top1"] <= 1 and res["kl"] > 0
    run("eval", model_dir, "--plan", tmp_path / "p.json", *common, "--calib", 2, "--eval-windows", 4,
        "--json", tmp_path / "e2.json")
    assert json.loads((tmp_path / "e2.json").read_text())["ppl"] == pytest.approx(res["ppl"])  # same RTN codes


def test_qerror_scores_drive_plan(model_dir, tmp_path, capsys):
    # qerror is the default scorer; --widths limits the measurement to the plan's widths
    run("score", model_dir, "--text", model_dir / "text.txt", "--seq-len", 64, "--calib", 2,
        "--group-size", 32, "--widths", "2,3,4", "--out", tmp_path / "q.json")
    assert "scored 4 layers (qerror)" in capsys.readouterr().out
    scores = json.loads((tmp_path / "q.json").read_text())
    assert scores["config"]["widths"] == [2, 3, 4] and scores["config"]["normalize"] == "reader"
    assert set(scores["damage"][0]) == {"2", "3", "4"}
    run("plan", tmp_path / "q.json", "--widths", "2,3,4", "--avg-bits", 3.0, "--out", tmp_path / "p.json")
    plan = BitPlan.load(tmp_path / "p.json")
    assert sum(plan.layer_bits) / 4 <= 3.0
    # the widest width's damage can be extrapolated instead of measured
    run("score", model_dir, "--text", model_dir / "text.txt", "--seq-len", 64, "--calib", 2,
        "--group-size", 32, "--widths", "2,3,4", "--no-measure-widest", "--out", tmp_path / "q2.json")
    cheap = json.loads((tmp_path / "q2.json").read_text())
    assert cheap["config"]["measure_widest"] is False and set(cheap["damage"][0]) == {"2", "3"}
    assert cheap["damage"][0]["3"] == scores["damage"][0]["3"]


def test_plan_errors(model_dir, tmp_path, capsys):
    run("score", model_dir, "--scorer", "lieq", "--text", model_dir / "text.txt", "--seq-len", 64, "--calib", 2,
        "--out", tmp_path / "s.json")
    capsys.readouterr()
    assert cli.main(["plan", str(tmp_path / "s.json"), "--widths", "2,4", "--avg-bits", "5"]) == 2
    assert "budget 5.0 is outside what widths [2, 4] can give" in capsys.readouterr().err
    assert cli.main(["plan", str(tmp_path / "s.json"), "--allocator", "oracle", "--widths", "2,4", "--avg-bits", "3"]) == 2
    assert "needs ΔPPL scores" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"pte stores no \[2\]-bit weights"):
        run("plan", tmp_path / "s.json", "--target", "pte", "--widths", "2,4", "--avg-bits", 3, "--out", tmp_path / "x.json")
    assert BitPlan.load(tmp_path / "x.json").symmetric  # XNNPACK needs symmetric 4/8-bit weights
    run("plan", tmp_path / "s.json", "--target", "pte", "--avg-bits", 5, "--out", tmp_path / "y.json")
    assert set(BitPlan.load(tmp_path / "y.json").layer_bits) == {4, 8}
