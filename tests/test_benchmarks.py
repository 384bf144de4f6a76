import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import precision  # noqa: E402


def test_paired_ratio_interval_and_last_windows():
    oracle = [3.0, 3.5, 2.8, 3.2, 3.1, 2.9, 3.3, 3.0, 3.4, 2.7]
    # same shift on every window: ratio exactly exp(0.05), no spread to resample
    flat = [x + 0.05 for x in oracle]
    # shifted only in the last two windows
    tail = oracle[:8] + [x + 0.5 for x in oracle[8:]]
    rows = [{"method": "rtn", "label": "b", "allocator": "oracle", "seed": None, "ppl": 1.0, "window_nll": oracle},
            {"method": "rtn", "label": "b", "allocator": "qerror", "seed": None, "ppl": 1.0, "window_nll": flat},
            {"method": "rtn", "label": "b", "allocator": "lieq", "seed": None, "ppl": 1.0, "window_nll": tail}]
    r = {x["allocator"]: x for x in precision.ratios(rows, n_boot=2000, last=2)}
    assert set(r) == {"qerror", "lieq"}
    assert r["qerror"]["ratio"] == pytest.approx(math.exp(0.05))
    assert r["qerror"]["ci95"] == pytest.approx([math.exp(0.05)] * 2)
    assert r["lieq"]["ratio"] == pytest.approx(math.exp(0.1))
    assert r["lieq"]["ratio_last"] == pytest.approx(math.exp(0.5))
    lo, hi = r["lieq"]["ci95"]
    assert 1.0 <= lo < math.exp(0.1) < hi <= math.exp(0.5)
