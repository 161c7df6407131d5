"""Parameter counts from abstract shapes: total, and active per token (routed experts count top_k/E)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from maxllama.config.schema import Config, VisionConfig
from maxllama.model.build import ModelDef


class ParamCount(NamedTuple):
    total: int  # every parameter, the vision encoder included
    active: int  # used per text token: routed experts count top_k / n_experts, the vision encoder not at all
    text_total: int
    vision_total: int


def _is_routed_expert(meta: dict) -> bool:
    return meta["role"] != "router" and "expert" in meta["logical_axes"]


def vision_param_count(v: VisionConfig, text_d_model: int) -> int:
    """Early-fusion vision encoder + adapter + projector, as docs/architecture.md ("Vision encoder") describes it, with biases."""
    if not v.enabled:
        return 0
    d, f = v.d_model, v.d_ff
    patches = (v.image_size // v.patch_size) ** 2
    patch_embed = 3 * v.patch_size ** 2 * d
    class_and_positions = d + (patches + 1) * d
    pre_post_norms = 2 * 2 * d
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    shuffled = int(d / v.pixel_shuffle_ratio ** 2)
    adapter = shuffled * v.projector_dim + v.projector_dim * v.projector_dim
    projector = v.projector_dim * text_d_model
    return patch_embed + class_and_positions + pre_post_norms + v.n_layers * block + adapter + projector


def count_params(cfg: Config, model: ModelDef) -> ParamCount:
    shapes = jax.tree.leaves(model.abstract_params)
    metas = jax.tree.leaves(model.metadata, is_leaf=lambda x: isinstance(x, dict) and "role" in x)
    total = active = 0
    routed_fraction = cfg.model.top_k / cfg.model.n_experts if cfg.model.n_experts else 0.0
    for shape, meta in zip(shapes, metas):
        n = int(np.prod(shape.shape))
        total += n
        active += round(n * routed_fraction) if _is_routed_expert(meta) else n
    vision = vision_param_count(cfg.vision, cfg.model.d_model)
    return ParamCount(total + vision, active, total, vision)
