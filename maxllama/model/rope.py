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
    return rotate_pairs(x, positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq))


def vision_rope_angles(grid: int, head_dim: int, theta: float) -> np.ndarray:
    """[grid^2 + 1, head_dim/2] angles of the vision encoder's 2D RoPE: the first half of the pairs turn with
    the patch's column + 1, the second half with its row + 1; the class token (last) does not turn."""
    freq_dim = head_dim // 2
    inv_freq = (1.0 / theta ** (np.arange(0, freq_dim, 2)[: freq_dim // 2].astype(np.float32) / freq_dim)).astype(np.float32)
    index = np.arange(grid * grid)
    columns, rows = (index % grid + 1).astype(np.float32), (index // grid + 1).astype(np.float32)
    angles = np.concatenate([columns[:, None] * inv_freq, rows[:, None] * inv_freq], axis=-1)
    return np.concatenate([angles, np.zeros((1, angles.shape[1]), np.float32)]).astype(np.float32)


def rotate_pairs(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate each pair (x[2i], x[2i+1]) by angles[..., i] (the complex product of the pair with e^(i angle)),
    in fp32; `angles` broadcasts against x's leading axes."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
