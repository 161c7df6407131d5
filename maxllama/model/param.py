"""Parameter creation: every parameter carries its logical axes (for sharding) and its MetaP role."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.metap import Parametrization, Role


def matrix(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, role: Role, fan_in: int,
           parametrization: Parametrization, dtype: jnp.dtype) -> nnx.Param:
    std = parametrization.init_std(role, fan_in)
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes), role=role, fan_in=fan_in)


def gain(size: int, axis: str, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones((size,), dtype), logical_axes=(axis,), role="vector", fan_in=1)


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    return variable.get_metadata("logical_axes")
