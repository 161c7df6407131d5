"""Grouped-query attention with Llama 4's two layer kinds.

RoPE layers: interleaved rotary embedding, optional weightless QK norm after it, chunked local attention.
NoPE layers: no positional embedding, global causal attention, and optional temperature tuning that scales
queries up with log position so attention stays sharp at long context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.config.schema import ModelConfig
from maxllama.metap import Parametrization
from maxllama.model.masks import chunked_causal_mask
from maxllama.model.norm import rms_normalize
from maxllama.model.param import matrix
from maxllama.model.rope import apply_rope, rope_frequencies
from maxllama.parallel.rules import LogicalSharding


def temperature_scale(positions: jax.Array, attn_scale: float, floor_scale: float) -> jax.Array:
    """Query scale of NoPE layers: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale)); 1 at short context."""
    pos = positions.astype(jnp.float32)
    return 1.0 + attn_scale * jnp.log1p(jnp.floor((pos + 1.0) / floor_scale))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, use_rope: bool, parametrization: Parametrization,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        make = dict(role="hidden", parametrization=parametrization, dtype=pdt)
        self.q = matrix(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d, **make)
        self.k = matrix(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), fan_in=d, **make)
        self.v = matrix(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), fan_in=d, **make)
        self.o = matrix(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=h * hd, **make)
        self.use_rope = use_rope
        self.cfg = cfg
        self.scale = parametrization.attention_scale(hd)
        self.sharding = sharding

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
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
            mask = chunked_causal_mask(segment_ids, positions, cfg.attn_chunk)
        else:
            if cfg.attn_temperature_tuning:
                scale = temperature_scale(positions, cfg.attn_scale, cfg.floor_scale)
                q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(dt)
            mask = chunked_causal_mask(segment_ids, positions, None)
        out = grouped_query_attention(q, k, v, mask, self.scale)
        out = self.sharding.constrain(out, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bthk,hkd->btd", out, self.o.value.astype(dt))


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
