"""Parameter counts from abstract shapes: total, and active per token (routed experts count top_k/E)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from maxllama.base.tree import flat_paths
from maxllama.config.schema import Config
from maxllama.model.build import ModelDef


class ParamCount(NamedTuple):
    total: int  # every parameter, the vision encoder included
    active: int  # used per text token: routed experts count top_k / n_experts, the vision encoder not at all
    text_total: int
    vision_total: int


def _is_routed_expert(meta: dict) -> bool:
    return meta["role"] != "router" and "expert" in meta["logical_axes"]


def count_params(cfg: Config, model: ModelDef) -> ParamCount:
    shapes = flat_paths(model.abstract_params)
    metas = flat_paths(model.metadata, is_leaf=lambda x: isinstance(x, dict) and "role" in x)
    text = active = vision = 0
    routed_fraction = cfg.model.top_k / cfg.model.n_experts if cfg.model.n_experts else 0.0
    for path, shape in shapes.items():
        n = int(np.prod(shape.shape))
        if path.startswith("vision."):
            vision += n
            continue
        text += n
        active += round(n * routed_fraction) if _is_routed_expert(metas[path]) else n
    return ParamCount(text + vision, active, text, vision)
