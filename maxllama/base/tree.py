"""Dotted paths of parameter trees: the names MetaP tables, checkpoints and error messages use."""

from __future__ import annotations

from typing import Any

import jax


def param_path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator=".")


def flat_paths(tree: Any, is_leaf=None) -> dict[str, Any]:
    """{'groups.blocks.0.attention.q': leaf, ...}."""
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
