"""The embedded default corpus: this Python's own standard-library source files.

Every machine with Python has it, so `make train` needs no download. Documents are files; the
train/validation split hashes each file's path relative to the library root, so it is stable across runs
and machines, and no file contributes to both splits.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
