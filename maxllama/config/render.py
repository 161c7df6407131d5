"""The resolved config as YAML with the origin of every value beside it: what `maxllama config show` prints."""

from __future__ import annotations

from typing import Mapping

import yaml

from maxllama.config.loader import resolved_origins
from maxllama.config.schema import Config


def render_with_origins(cfg: Config, origins: Mapping[str, str]) -> str:
    """Each leaf annotated with where its value came from: file:line, override, metap.from or default."""
    where = resolved_origins(cfg, origins)
    lines: list[str] = []

    def emit(tree: dict, prefix: str, indent: int) -> None:
        for key, value in tree.items():
            dotted = prefix + key
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                emit(value, dotted + ".", indent + 1)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                entry = f"{pad}{key}: {text}"
                lines.append(f"{entry:<48} # {where.get(dotted, 'default')}")

    emit(cfg.model_dump(), "", 0)
    return "\n".join(lines)
