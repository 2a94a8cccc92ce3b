"""The quickstart corpus: the Python standard-library source of the running interpreter.

Present on every machine that runs this project, so the quickstart needs no download.
The held-out split is chosen by a hash of each file's path relative to the stdlib root,
so it is the same on every machine with the same Python version, and independent of file order.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "heldout", "all")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str, heldout_percent: float) -> bool:
    digest = hashlib.sha1(relative_path.encode()).hexdigest()
    return int(digest[:8], 16) % 10_000 < heldout_percent * 100


def stdlib_files(split: str = "train", heldout_percent: float = 3.0) -> list[Path]:
    """Sorted .py files of the stdlib (third-party site-packages and test suites left out)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "test" in parts or "tests" in parts:
            continue
        if split != "all" and is_heldout(path.relative_to(root).as_posix(), heldout_percent) != (split == "heldout"):
            continue
        files.append(path)
    return files


def stdlib_documents(split: str = "train", heldout_percent: float = 3.0) -> Iterator[str]:
    """One document per source file."""
    for path in stdlib_files(split, heldout_percent):
        yield path.read_text(encoding="utf-8", errors="replace")
