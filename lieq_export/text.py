"""Text for calibration and evaluation, cut into fixed token windows.

Windows are consecutive, non-overlapping slices of one token stream. Calibration takes
windows from the front of the stream and evaluation from the back, so the two never
share a token and the split does not depend on how many windows each side asks for.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEXT = "pydoc"
DEFAULT_SEQ_LEN = 512
HF_DATASETS = {
    # name -> (dataset, config, split, text column)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}


class TextError(ValueError):
    pass


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    # Sorted keys: dict order is fixed by the CPython release, but sorting keeps the
    # stream identical even if a release reorders the table.
    return "\n\n".join(topics[k] for k in sorted(topics))


def hf_dataset_text(name: str, max_docs: int | None = 20000) -> str:
    try:
        import datasets
    except ImportError as e:
        raise TextError(f"text {name!r} needs the `datasets` package: pip install datasets") from e
    path, config, split, column = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=(name == "c4"))
    except Exception as e:  # network errors come in many types
        raise TextError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "the hub is unreachable here: use --text pydoc or a local .txt file or folder"
        ) from e
    docs = []
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        docs.append(row[column])
    return "\n\n".join(docs)


def load_text(spec: str = DEFAULT_TEXT) -> str:
    """`pydoc`, a dataset name in HF_DATASETS, a .txt file, or a folder of .txt files."""
    if spec == "pydoc":
        return pydoc_text()
    if spec in HF_DATASETS:
        return hf_dataset_text(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise TextError(f"folder {spec} has no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise TextError(
        f"text {spec!r} not found: give 'pydoc', one of {sorted(HF_DATASETS)}, a .txt file or a folder of .txt files"
    )


def token_windows(tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """All full, non-overlapping windows of `seq_len` tokens: LongTensor [n, seq_len]."""
    if seq_len < 2:
        raise TextError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise TextError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def split_windows(windows: torch.Tensor, n_calib: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation): the first n_calib windows and the last n_eval."""
    n = windows.shape[0]
    if n_calib < 0 or n_eval < 0:
        raise TextError("window counts must be non-negative")
    if n_calib + n_eval > n:
        raise TextError(
            f"asked for {n_calib} calibration + {n_eval} evaluation windows but the text gives only {n}; "
            "use fewer windows, shorter windows (--seq-len) or more text"
        )
    return windows[:n_calib], windows[n - n_eval :]


def load_windows(tokenizer, spec: str, n_calib: int, n_eval: int, seq_len: int = DEFAULT_SEQ_LEN):
    return split_windows(token_windows(tokenizer, load_text(spec), seq_len), n_calib, n_eval)


def text_fingerprint(windows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
