"""Parameter creation: every parameter carries its logical axes (for sharding) and its fan-in axes (from
which MetaP finds its role). Matrices are drawn unit-normal; `init_params` scales each to its MetaP init std,
so the model hard-codes no init scale."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def matrix(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, fan_in: Sequence[str],
           dtype: jnp.dtype) -> nnx.Param:
    """`fan_in`: the logical axes that the parameter contracts its input over."""
    value = jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes), fan_in_axes=tuple(fan_in))


def gain(size: int, axis: str, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones((size,), dtype), logical_axes=(axis,), fan_in_axes=())


def bias(shape: Sequence[int], axes: Sequence[str], dtype: jnp.dtype) -> nnx.Param:
    """An additive bias (or a LayerNorm shift): zeros, and no fan-in, so MetaP gives it the role of a gain."""
    return nnx.Param(jnp.zeros(tuple(shape), dtype), logical_axes=tuple(axes), fan_in_axes=())


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    return variable.get_metadata("logical_axes")
