"""Build the decoder abstractly (shapes only), read its parameter metadata, and initialise it sharded."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from maxllama.config.schema import Config
from maxllama.metap import Parametrization, parametrization_for
from maxllama.model.decoder import Decoder
from maxllama.parallel.rules import LogicalSharding


class ModelDef(NamedTuple):
    graphdef: Any  # nnx.GraphDef of the Decoder: the static structure
    abstract_params: dict  # pure dict of jax.ShapeDtypeStruct
    metadata: dict  # pure dict of {'role', 'fan_in', 'logical_axes'} per parameter
    parametrization: Parametrization


def _construct(cfg: Config, sharding: LogicalSharding, seed: int) -> Decoder:
    return Decoder(cfg.model, parametrization=parametrization_for(cfg), sharding=sharding, rngs=nnx.Rngs(seed))


def define_model(cfg: Config, sharding: LogicalSharding) -> ModelDef:
    """Shapes, metadata and structure of the model without allocating a single parameter."""
    abstract = nnx.eval_shape(lambda: _construct(cfg, sharding, cfg.seed))
    graphdef, state = nnx.split(abstract)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    metadata = jax.tree.map(
        lambda v: {"role": v.get_metadata("role"), "fan_in": v.get_metadata("fan_in"),
                   "logical_axes": v.get_metadata("logical_axes")}, state, is_leaf=is_var)
    return ModelDef(graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(metadata), parametrization_for(cfg))


def param_shardings(model: ModelDef, sharding: LogicalSharding) -> dict:
    return jax.tree.map(lambda m: sharding.named(m["logical_axes"]), model.metadata,
                        is_leaf=lambda x: isinstance(x, dict) and "logical_axes" in x)


def sharded_abstract_params(model: ModelDef, sharding: LogicalSharding) -> dict:
    """ShapeDtypeStructs with the parameters' shardings: a restore or compile target that allocates nothing."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.abstract_params, param_shardings(model, sharding))


def init_params(cfg: Config, model: ModelDef, sharding: LogicalSharding) -> dict:
    """Initialise parameters directly into their shards (never materialised whole on one device)."""

    def init():
        return nnx.to_pure_dict(nnx.state(_construct(cfg, sharding, cfg.seed)))

    return jax.jit(init, out_shardings=param_shardings(model, sharding))()


def bind(model: ModelDef, params: dict) -> Decoder:
    return nnx.merge(model.graphdef, params)
