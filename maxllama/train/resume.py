"""A run directory against the config it is resumed with: refuse another run's changes, record the rest.

The config a checkpoint was saved with (or the run directory's config.yaml, before any checkpoint) is
compared with the one given now, key by key (`maxllama.config.compat` says which keys a resumed run may
change). The tokenizer is compared by its fingerprint too: the same path can hold another vocabulary. Every
start and resume appends a row to `config_history.jsonl` with the changes it accepted, so the config any step
was trained with can be told from the run directory alone.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml

from maxllama.checkpoint.manager import ResumeError
from maxllama.config import dump_config
from maxllama.config.compat import config_changes, describe, split_changes
from maxllama.config.schema import Config

CONFIG_HISTORY = "config_history.jsonl"
TOKENIZER_CONTENTS = "data.tokenizer (its contents)"


class IncompatibleConfig(ResumeError):
    """The run directory was trained with a configuration this one cannot continue."""


def resume_changes(saved_config: str | None, saved_tokenizer: str | None, cfg: Config, tokenizer: str,
                   run_dir: Path, source: str) -> dict[str, tuple[Any, Any]]:
    """The accepted changes from the saved config to `cfg`; raises IncompatibleConfig naming every refused
    one. `source` says where the saved config was read (a checkpoint, config.yaml)."""
    if saved_config is None:
        return {}
    changes = config_changes(yaml.safe_load(saved_config), yaml.safe_load(dump_config(cfg)))
    if saved_tokenizer and saved_tokenizer != tokenizer and "data.tokenizer" not in changes:
        changes[TOKENIZER_CONTENTS] = (f"fingerprint {saved_tokenizer[:12]}", f"fingerprint {tokenizer[:12]}")
    refused, accepted = split_changes(changes)
    if refused:
        raise IncompatibleConfig(
            f"{run_dir} was trained with another configuration ({source}); these changes cannot continue it: "
            f"{describe(refused)}. Nothing in the run directory was changed. To train this configuration, give "
            f"it a new run.dir, or start a new run from these weights with init_from={run_dir}")
    return accepted


def record_config(run_dir: Path, cfg: Config, step: int, accepted: dict[str, tuple[Any, Any]], *,
                  resumed: bool) -> None:
    """Write the config in force (config.yaml) and append this start to the run's config history."""
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    row = {"step": step, "event": "resume" if resumed else "start",
           "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "changes": {key: [old, new] for key, (old, new) in accepted.items()}}
    with (run_dir / CONFIG_HISTORY).open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_config_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / CONFIG_HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
