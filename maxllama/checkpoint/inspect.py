"""`maxllama checkpoint list|inspect`: what a run directory holds, read from metadata (no arrays loaded)."""

from __future__ import annotations

import datetime
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from maxllama.base.tree import param_path
from maxllama.checkpoint.manager import UNREADABLE, Checkpointer
from maxllama.checkpoint.model_dir import locate_checkpoint


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def list_checkpoints(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(directory)
    checkpointer = Checkpointer(directory, read_only=True)
    lines = [f"{'step':>8}  {'size':>10}  {'items':<24}  saved"]
    for step in checkpointer.steps():
        path = directory / str(step)
        items = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir()))
        when = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        problem = checkpointer.problem(step)
        unreadable = f"  UNREADABLE ({problem}); resuming skips it" if problem else ""
        lines.append(f"{step:>8}  {_human(_size(path)):>10}  {items:<24}  {when}{unreadable}")
    checkpointer.close()
    partial = sorted(p.name for p in directory.iterdir() if "tmp" in p.name)
    if partial:
        lines.append(f"incomplete (interrupted saves, ignored when resuming): {', '.join(partial)}")
    aside = sorted(p.name for p in directory.iterdir() if f".{UNREADABLE}" in p.name)
    if aside:
        lines.append(f"set aside (unreadable when resumed, kept for inspection): {', '.join(aside)}")
    if len(lines) == 1:
        lines.append("(no complete checkpoint)")
    return "\n".join(lines)


def inspect_checkpoint(path: str | Path) -> str:
    run_dir, step = locate_checkpoint(path)
    step_dir = run_dir.resolve() / "checkpoints" / str(step)  # Orbax reads array metadata from absolute paths only
    checkpointer = Checkpointer(run_dir / "checkpoints", read_only=True)
    meta = checkpointer.meta(step) or {}
    checkpointer.close()
    lines = [f"checkpoint {step_dir}: step {step}, {_human(_size(step_dir))}"]
    config_text = meta.get("config") or ((run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else "")
    if config_text:
        cfg = yaml.safe_load(config_text)
        m = cfg["model"]
        lines.append(f"model: d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} heads, "
                     f"{m['n_experts']} experts (top-{m['top_k']}, every {m['moe_every']}), vocab {m['vocab_size']}; "
                     f"train: {cfg['train']['steps']} steps of {cfg['train']['batch_size']} x {cfg['train']['seq_len']}")
    lines.append(f"data position: batch {step} (the batch at a step is a function of the step)")
    for item in ("params", "opt_state"):
        if not (step_dir / item).is_dir():
            continue
        tree = ocp.StandardCheckpointHandler().metadata(step_dir / item)
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        total = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
        lines.append(f"{item}: {len(leaves)} arrays, {total:,} values")
        if item == "params":
            for key_path, leaf in leaves:
                name = param_path(key_path)
                lines.append(f"  {name:<48} {str(tuple(leaf.shape)):<22} {leaf.dtype}")
    return "\n".join(lines)
