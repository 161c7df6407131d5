"""Grouped-query attention with Llama 4's two layer kinds.

RoPE layers: interleaved rotary embedding, optional weightless QK norm after it, chunked local attention.
NoPE layers: no positional embedding, global causal attention, and optional temperature tuning that scales
queries up with log position so attention stays sharp at long context.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.config.schema import ModelConfig
from maxllama.metap import Parametrization
from maxllama.model.masks import attention_mask, chunked_causal_mask
from maxllama.model.norm import rms_normalize
from maxllama.model.param import matrix
from maxllama.model.rope import apply_rope, rope_frequencies
from maxllama.parallel.rules import LogicalSharding


class KVCache(NamedTuple):
    """Keys and values of every position decoded so far: [B, max_len, kv_heads, head_dim] each."""

    k: jax.Array
    v: jax.Array


def temperature_scale(positions: jax.Array, attn_scale: float, floor_scale: float) -> jax.Array:
    """Query scale of NoPE layers: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale)); 1 at short context."""
    pos = positions.astype(jnp.float32)
    return 1.0 + attn_scale * jnp.log1p(jnp.floor((pos + 1.0) / floor_scale))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, use_rope: bool, parametrization: Parametrization,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        make = dict(dtype=pdt)
        self.q = matrix(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=("embed",), **make)
        self.k = matrix(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), fan_in=("embed",), **make)
        self.v = matrix(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), fan_in=("embed",), **make)
        self.o = matrix(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=("heads", "head_dim"), **make)
        self.use_rope = use_rope
        self.cfg = cfg
        self.scale = parametrization.attention_scale
        self.sharding = sharding

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """Self-attention over x; with a cache, x continues the cached sequence at `cache_index` (one
        document per row, positions = indices) and the updated cache is returned."""
        cfg, dt = self.cfg, x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.q.value.astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.k.value.astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.v.value.astype(dt))
        q = self.sharding.constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = self.sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        if self.use_rope:
            inv_freq = rope_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
            if cfg.qk_norm:
                q, k = rms_normalize(q, cfg.norm_eps), rms_normalize(k, cfg.norm_eps)
        elif cfg.attn_temperature_tuning:
            scale = temperature_scale(positions, cfg.attn_scale, cfg.floor_scale)
            q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(dt)
        chunk = cfg.attn_chunk if self.use_rope else None
        if cache is None:
            mask = chunked_causal_mask(segment_ids, positions, chunk)
        else:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, cache_index, 0, 0))
            cache = KVCache(k, v)
            key_index = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
            zeros_q, zeros_k = jnp.zeros_like(positions), jnp.zeros_like(key_index)
            mask = attention_mask(positions, key_index, positions, key_index, zeros_q, zeros_k, chunk)
        out = grouped_query_attention(q, k.astype(dt), v.astype(dt), mask, self.scale)
        out = self.sharding.constrain(out, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bthk,hkd->btd", out, self.o.value.astype(dt)), cache


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, S, KV, D] with H a multiple of KV; mask: [B, T, S]. Softmax in fp32."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(b, t, h, d)
