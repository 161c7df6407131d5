"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.model.param import matrix


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_hidden: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        make = dict(dtype=param_dtype)
        self.gate = matrix(rngs, (d_model, d_hidden), ("embed", "mlp"), fan_in=("embed",), **make)
        self.up = matrix(rngs, (d_model, d_hidden), ("embed", "mlp"), fan_in=("embed",), **make)
        self.down = matrix(rngs, (d_hidden, d_model), ("mlp", "embed"), fan_in=("mlp",), **make)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        hidden = jax.nn.silu(x @ self.gate.value.astype(dt)) * (x @ self.up.value.astype(dt))
        return hidden @ self.down.value.astype(dt)
