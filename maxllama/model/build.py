"""Build the decoder abstractly (shapes only), give every parameter its MetaP rule, and initialise it sharded."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from maxllama.base.tree import flat_paths, param_path
from maxllama.config.schema import Config, ModelConfig, VisionConfig
from maxllama.metap import Parametrization, param_rule, parametrization_for
from maxllama.metap.shapes import double_width_model, double_width_vision, proxy_model, proxy_vision, roles_and_ratios
from maxllama.model.decoder import Decoder, in_residual_branch
from maxllama.parallel.rules import LogicalSharding

IS_META = lambda x: isinstance(x, dict) and "logical_axes" in x  # noqa: E731


class ModelDef(NamedTuple):
    graphdef: Any  # nnx.GraphDef of the Decoder: the static structure
    abstract_params: dict  # pure dict of jax.ShapeDtypeStruct
    metadata: dict  # pure dict of {'logical_axes', 'fan_in_axes', 'role'} per parameter
    rules: dict  # pure dict of ParamRule per parameter: init std, LR multiplier, weight decay, Adam eps
    parametrization: Parametrization  # the forward multipliers


def _abstract(model_cfg: ModelConfig, vision: VisionConfig, parametrization: Parametrization,
              sharding: LogicalSharding, seed: int):
    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, vision=vision, parametrization=parametrization,
                                              sharding=sharding, rngs=nnx.Rngs(seed)))
    return nnx.split(abstract)


def one_device_sharding() -> LogicalSharding:
    """A mesh of one device: enough for whatever depends only on shapes (roles, rules, parameter counts)."""
    return LogicalSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)))


@functools.lru_cache(maxsize=64)
def _shapes(model_cfg: ModelConfig, vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a model config (structure only: multipliers and mesh do not change them)."""
    _, state = _abstract(model_cfg, vision, Parametrization("shapes"), one_device_sharding(), 0)
    return {path: tuple(s.shape) for path, s in flat_paths(nnx.to_pure_dict(state)).items()}


def define_abstract(cfg: Config) -> ModelDef:
    """The model from shapes alone on one device, whatever the config's mesh: enough for parameter counts and
    MetaP's table, even of a 400B-parameter config on a laptop."""
    return define_model(cfg, one_device_sharding())


def define_model(cfg: Config, sharding: LogicalSharding) -> ModelDef:
    """Shapes, metadata, MetaP rules and structure of the model without allocating a single parameter."""
    parametrization = parametrization_for(cfg)
    graphdef, state = _abstract(cfg.model, cfg.vision, parametrization, sharding, cfg.seed)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    metadata = nnx.to_pure_dict(jax.tree.map(
        lambda v: {"logical_axes": v.get_metadata("logical_axes"), "fan_in_axes": v.get_metadata("fan_in_axes")},
        state, is_leaf=is_var))
    abstract_params = nnx.to_pure_dict(state)
    flat_meta = flat_paths(metadata, is_leaf=IS_META)
    shapes = {path: tuple(s.shape) for path, s in flat_paths(abstract_params).items()}
    roles = roles_and_ratios(flat_meta, shapes, _shapes(proxy_model(cfg), proxy_vision(cfg)),
                             _shapes(double_width_model(cfg.model), double_width_vision(cfg.vision)))
    for path, meta in flat_meta.items():
        meta["role"] = roles[path][0]

    def rule(key_path, _):
        path = param_path(key_path)
        role, ratio, out_ratio = roles[path]
        return param_rule(cfg, role, ratio, in_branch=in_residual_branch(path), query=_is_query(path),
                          fan_out_ratio=out_ratio)

    rules = jax.tree_util.tree_map_with_path(rule, metadata, is_leaf=IS_META)
    return ModelDef(graphdef, abstract_params, metadata, rules, parametrization)


def _is_query(path: str) -> bool:
    return path.endswith("attention.q")


def param_shardings(model: ModelDef, sharding: LogicalSharding) -> dict:
    return jax.tree.map(lambda m: sharding.named(m["logical_axes"]), model.metadata, is_leaf=IS_META)


def sharded_abstract_params(model: ModelDef, sharding: LogicalSharding) -> dict:
    """ShapeDtypeStructs with the parameters' shardings: a restore or compile target that allocates nothing."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.abstract_params, param_shardings(model, sharding))


def initializer(cfg: Config, model: ModelDef, sharding: LogicalSharding) -> Callable[[int], dict]:
    """seed -> parameters, initialised directly into their shards (never materialised whole on one device): the
    model draws unit normals (ones for gains) and each is scaled to its MetaP init std. One compile, any seed."""

    def init(seed):
        unit = nnx.to_pure_dict(nnx.state(Decoder(cfg.model, vision=cfg.vision, parametrization=model.parametrization,
                                                  sharding=sharding, rngs=nnx.Rngs(jax.random.key(seed)))))
        return jax.tree.map(lambda x, rule: x if rule.init_std is None else (x * rule.init_std).astype(x.dtype),
                            unit, model.rules)

    return jax.jit(init, out_shardings=param_shardings(model, sharding))


def init_params(cfg: Config, model: ModelDef, sharding: LogicalSharding) -> dict:
    return initializer(cfg, model, sharding)(cfg.seed)


def bind(model: ModelDef, params: dict) -> Decoder:
    return nnx.merge(model.graphdef, params)
