import pytest

from lieq_export.text import TextError, load_text, split_windows, token_windows


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_pydoc_text_is_builtin_english():
    text = load_text("pydoc")
    assert len(text) > 100_000 and "the" in text


def test_txt_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 10)
    (tmp_path / "b.txt").write_text("beta " * 10)
    assert load_text(str(tmp_path / "a.txt")) == "alpha " * 10
    both = load_text(str(tmp_path))
    assert both.index("alpha") < both.index("beta")


def test_missing_text_and_empty_folder(tmp_path):
    with pytest.raises(TextError, match="not found: give 'pydoc'"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(TextError, match="has no .txt files"):
        load_text(str(tmp_path))


def test_windows_split_never_overlap_and_are_deterministic():
    text = "".join(chr(32 + i % 90) for i in range(10_000))
    w = token_windows(CharTokenizer(), text, seq_len=100)
    assert w.shape == (100, 100)
    calib, ev = split_windows(w, 30, 20)
    assert calib.shape[0] == 30 and ev.shape[0] == 20
    assert calib[-1].data_ptr() < ev[0].data_ptr()  # calibration from the front, evaluation from the back
    c2, e2 = split_windows(token_windows(CharTokenizer(), text, seq_len=100), 30, 20)
    assert (c2 == calib).all() and (e2 == ev).all()
    # asking for more calibration never moves the evaluation windows
    _, e3 = split_windows(w, 60, 20)
    assert (e3 == ev).all()


def test_too_few_windows_is_a_clear_error():
    w = token_windows(CharTokenizer(), "x" * 1000, seq_len=100)
    with pytest.raises(TextError, match="gives only 10"):
        split_windows(w, 8, 8)
    with pytest.raises(TextError, match="fewer than one window"):
        token_windows(CharTokenizer(), "short", seq_len=100)


def test_hub_dataset_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TextError, match="wikitext2"):
        load_text("wikitext2")
