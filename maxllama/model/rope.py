"""Rotary position embedding in Llama 4's interleaved (complex-number) form, with "llama3" scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.config.schema import RopeScalingConfig


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/head_dim), bent by "llama3" scaling: long wavelengths divided by `factor`,
    short ones kept, a smooth blend in between (empty band when low == high, as in Scout)."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq.astype(np.float32)
    original, low, high = scaling.original_max_position, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    if high > low:  # select, don't divide: with low == high the band is empty and the blend undefined
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        scaled = np.where(in_band, blended, scaled)
    return scaled.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (x[2i], x[2i+1]) by positions * inv_freq[i]. x: [B, T, heads, head_dim]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [B, T, 1, head_dim/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
