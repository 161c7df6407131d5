"""Base shapes and roles, found the way muP finds them: by comparing abstract parameter shapes.

Three models are compared, all at this run's depth and expert count so that their parameter trees match
path for path: this run, the proxy (this run with the proxy's widths: `metap.base`), and this run at double
width. A dimension that differs between this run and its double-width twin scales with width; a parameter's
role follows from whether its fan-in and its fan-out scale. Its width ratio m is its fan-in here over its
fan-in in the proxy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from maxllama.config.schema import Config, MetaPBaseConfig, ModelConfig, VisionConfig

if TYPE_CHECKING:  # the rules build on the proxy model defined here
    from maxllama.metap.rules import Role

# Axes that never count towards a width ratio: depth and expert count are axes of their own.
NOT_WIDTH = ("layers", "expert")


def proxy_model(cfg: Config) -> ModelConfig:
    """This run's model with the proxy's widths (depth and experts kept: they scale by their own rules)."""
    base = cfg.metap.base
    update = {key: getattr(base, key) for key in MetaPBaseConfig.WIDTH_KEYS if getattr(base, key) is not None}
    return cfg.model.model_copy(update=update)


def proxy_vision(cfg: Config) -> VisionConfig:
    """This run's vision encoder with the proxy's vision widths."""
    base = cfg.metap.base
    update = {key: getattr(base, f"vision_{key}") for key in MetaPBaseConfig.VISION_WIDTH_KEYS
              if getattr(base, f"vision_{key}") is not None}
    return cfg.vision.model_copy(update=update)


def double_width_vision(vision: VisionConfig) -> VisionConfig:
    return vision.model_copy(update={key: 2 * getattr(vision, key) for key in MetaPBaseConfig.VISION_WIDTH_KEYS})


def double_width_model(model: ModelConfig) -> ModelConfig:
    return model.model_copy(update={
        "d_model": 2 * model.d_model, "d_ff": 2 * model.d_ff, "d_ff_expert": 2 * model.d_ff_expert,
        "n_heads": 2 * model.n_heads, "n_kv_heads": 2 * model.n_kv_heads, "head_dim": model.resolved_head_dim})


def classify(path: str, logical_axes: Sequence[str], fan_in_axes: Sequence[str],
             shape: Sequence[int], wide_shape: Sequence[int]) -> Role:
    """Input-like (only fan-out scales): embedding; hidden (both); output-like (only fan-in): readout, or
    router when its outputs are experts; a parameter with no fan-in (a norm gain): vector."""
    if not fan_in_axes:
        return "vector"
    grows = {name for name, a, b in zip(logical_axes, shape, wide_shape) if a != b}
    fan_out = [name for name in logical_axes if name not in fan_in_axes]
    fan_in_grows, fan_out_grows = bool(grows & set(fan_in_axes)), bool(grows & set(fan_out))
    if fan_in_grows and fan_out_grows:
        return "hidden"
    if fan_in_grows:
        return "router" if "expert" in fan_out else "readout"
    if fan_out_grows:
        return "embedding"
    raise ValueError(f"parameter {path}: no dimension scales with width, so MetaP cannot give it a role")


def width_ratio(role: Role, logical_axes: Sequence[str], fan_in_axes: Sequence[str],
                shape: Sequence[int], proxy_shape: Sequence[int]) -> float:
    """m: fan-in here / fan-in in the proxy; for embeddings and gains (constant fan-in), the fan-out ratio."""
    axes = fan_in_axes if role in ("hidden", "readout", "router") else \
        [a for a in logical_axes if a not in fan_in_axes and a not in NOT_WIDTH]
    index = {name: i for i, name in enumerate(logical_axes)}
    return math.prod(shape[index[a]] / proxy_shape[index[a]] for a in axes)


def fan_out_ratio(logical_axes: Sequence[str], fan_in_axes: Sequence[str], shape: Sequence[int],
                  proxy_shape: Sequence[int]) -> float:
    """fan-out here / fan-out in the proxy (depth and expert axes aside)."""
    return math.prod(a / b for name, a, b in zip(logical_axes, shape, proxy_shape)
                     if name not in fan_in_axes and name not in NOT_WIDTH)


def roles_and_ratios(metadata: Mapping[str, Any], shapes: Mapping[str, Any], proxy_shapes: Mapping[str, Any],
                     wide_shapes: Mapping[str, Any]) -> dict[str, tuple[Role, float, float]]:
    """{path: (role, m, fan-out ratio)} from flat {path: metadata} and flat {path: shape} maps of the three
    models."""
    out = {}
    for path, meta in metadata.items():
        axes, fan_in = meta["logical_axes"], meta["fan_in_axes"]
        if path not in proxy_shapes or path not in wide_shapes:
            raise ValueError(f"parameter {path} is missing from the proxy model: the proxy must have the same structure")
        role = classify(path, axes, fan_in, shapes[path], wide_shapes[path])
        out[path] = (role, width_ratio(role, axes, fan_in, shapes[path], proxy_shapes[path]),
                     fan_out_ratio(axes, fan_in, shapes[path], proxy_shapes[path]))
    return out
