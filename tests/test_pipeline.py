"""`lieq-export run` end to end on a tiny model, for both targets, and its stage cache."""

import json
import shutil
import subprocess

import pytest
import torch

from lieq_export import cli
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_pte import TEXT, fit_text, make_tokenizer

    d = tmp_path_factory.mktemp("tiny_run")
    tok = make_tokenizer(None)
    m = tiny_model("llama", layers=2, hidden=64, vocab=320)
    fit_text(m, tok, steps=30, lr=1e-2, generator=torch.Generator().manual_seed(0))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "text.txt").write_text(TEXT * 40)
    return d


def _run(model_dir, out, bits, *extra):
    args = ["run", str(model_dir), "--avg-bits", str(bits), "--text", str(model_dir / "text.txt"), "--seq-len", "32",
            "--calib", "4", "--eval-windows", "2", "--verify-tokens", "32", "--max-seq-len", "64",
            "--group-size", "32", "--scorer", "lieq", "--out", str(out), *extra]
    assert cli.main(args) == 0
    return json.loads((out / "runs" / f"{bits:g}bit.json").read_text())


def test_run_both_targets_then_reuse_scores(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    r1 = _run(model_dir, out, 3.0, "--method", "rtn", "--delta-ppl", "--widths", "2,4")
    assert sorted(r1["plan"]["layer_bits"]) == [2, 4]  # one layer each
    for target in ("pte", "onnx"):
        t = r1["targets"][target]
        assert t["top1_vs_reference"] >= 0.95, (target, t)
        assert t["ppl"] == pytest.approx(r1["reference"]["reference_ppl"], rel=0.05)
        assert (out / f"{target}-3bit" / "manifest.json").is_file()
        assert t["model_bytes"] > 0 and t["tokens_per_s"] > 0
    assert all(not s["cached"] for s in r1["stages"])
    html = (out / "report.html").read_text()
    for png in ("scores.png", "delta_ppl.png", "ppl_vs_bits.png", "sizes.png", "speed.png"):
        assert f'src="{png}"' in html and (out / png).stat().st_size > 1000

    # the second budget exports ONNX only, to keep the test short: the cache is what is under test
    r2 = _run(model_dir, out, 4.0, "--method", "rtn", "--delta-ppl", "--targets", "onnx", "--widths", "2,4")
    cached = {s["stage"]: s["cached"] for s in r2["stages"]}
    assert cached["score"] is True  # same model, text and scorer: scores reused across budgets
    assert cached["quantize"] is False
    assert r2["plan"]["layer_bits"] == [4, 4]
    assert "reused score" in capsys.readouterr().out
    # both budgets are in the report's table
    html = (out / "report.html").read_text()
    assert html.count("<tr><td>3</td>") == 2 and html.count("<tr><td>4</td>") == 1

    # an interrupted run resumes: the finished stages of this budget are all reused
    shutil.rmtree(out / "onnx-4bit")
    r3 = _run(model_dir, out, 4.0, "--method", "rtn", "--delta-ppl", "--targets", "onnx", "--widths", "2,4")
    cached = {s["stage"]: s["cached"] for s in r3["stages"]}
    assert cached == {"score": True, "quantize": True, "export onnx": False}


@pytest.mark.slow
def test_report_renders_in_chromium(model_dir, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    out = tmp_path / "out"
    _run(model_dir, out, 3.0, "--method", "rtn", "--targets", "onnx", "--widths", "2,4")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--virtual-time-budget=5000", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "<title>images loaded: 4/4</title>" in dom  # scores, ppl_vs_bits, sizes, speed
