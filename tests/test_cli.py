import pytest

from lieq_export import cli


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("info", "score", "plan", "quantize", "eval", "export", "generate", "chat", "run"):
        assert name in out


def test_info_prints_layout_and_uniform_accounting(smollm2, monkeypatch, capsys):
    monkeypatch.setattr("lieq_export.models.load_model", lambda *a, **k: smollm2)
    assert cli.main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out
    assert "decoder layers    30" in out
    assert "134,515,008" in out and "106,168,320" in out and "28,311,552" in out
    assert "default group     64" in out
    lines = [l.split() for l in out.splitlines() if l.strip()[:1] in "2348" and len(l.split()) == 6]
    assert [int(l[0]) for l in lines] == [2, 3, 4, 8]
    assert [float(l[1]) for l in lines] == [2.0, 3.0, 4.0, 8.0]
    assert [float(l[2]) for l in lines] == [4.0, 4.0, 4.0, 8.0]  # XNNPACK stores 2/3-bit in 4-bit
    assert [float(l[3]) for l in lines] == [2.0, 4.0, 4.0, 8.0]  # ONNX stores 3-bit in INT4


def test_bad_model_is_an_error_not_a_traceback(capsys):
    assert cli.main(["info", "no-such-model"]) == 2
    assert "lieq-export: error: model 'no-such-model' not found" in capsys.readouterr().err
