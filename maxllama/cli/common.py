"""What the command groups share: reading `[CONFIG] [KEY=VALUE ...]` arguments and a few argument types."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from maxllama.base.errors import UserError

DEFAULT_CONFIG = "experiments/tiny.yaml"
EXIT_USER_ERROR = 2


def split_config_and_overrides(args: Sequence[str], default: str | None) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return default, list(args)


def load(args: Sequence[str], default: str | None = None):
    """(path, config, origins) from `[CONFIG] [KEY=VALUE ...]`; `default` when no config file is named."""
    from maxllama.config import load_config
    path, overrides = split_config_and_overrides(args, default)
    if path is not None and not Path(path).exists():
        raise UserError(f"config file not found: {path}")
    cfg, origins = load_config(path, overrides)
    return path, cfg, origins


def load_distributed(args: Sequence[str]):
    """The config of `[CONFIG] [KEY=VALUE ...]` (default experiments/tiny.yaml), with jax.distributed started
    as it says: what the commands that compile the step need first."""
    _, cfg, _ = load(args, DEFAULT_CONFIG)
    from maxllama.parallel.distributed import initialize
    initialize(cfg.distributed)
    return cfg


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def format_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
