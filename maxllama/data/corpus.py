"""The embedded default corpus: this Python's own standard-library source files.

Every machine with Python has it, so `make train` needs no download. The train/validation split is by
file, decided by a hash of the file's path relative to the library root: stable across runs and
machines, and no file contributes to both splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import NamedTuple


class CorpusSplit(NamedTuple):
    train: list[Path]
    validation: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def held_out(relative_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def split_files(files: list[Path], root: Path, val_fraction: float) -> CorpusSplit:
    validation = [f for f in files if held_out(f.relative_to(root).as_posix(), val_fraction)]
    chosen = set(validation)
    return CorpusSplit([f for f in files if f not in chosen], validation)
