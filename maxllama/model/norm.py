"""RMSNorm, `x * rsqrt(mean(x^2) + eps)` computed in fp32 and cast back (docs/architecture.md, "The decoder")."""

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.model.param import bias, gain


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """Weightless RMS normalisation over the last axis (also the QK norm of RoPE layers)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, in fp32: the vision encoder's norm."""

    def __init__(self, size: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.weight = gain(size, "embed", param_dtype)
        self.bias = bias((size,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.weight = gain(size, "embed", param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_normalize(x, self.eps) * self.weight.value.astype(x.dtype)
