"""Attention masks from token indices, per-document positions and segment ids.

A query sees a key when the key is not in its future and in the same document; on chunked (local)
layers also only inside its chunk: `pos_k // chunk == pos_q // chunk`. Positions restart at 0 in every
packed document, so chunks are aligned to document starts, as when documents run one by one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   q_segment: jax.Array, k_segment: jax.Array, chunk: int | None) -> jax.Array:
    """[B, Tq] and [B, Tk] index/position/segment arrays -> [B, Tq, Tk] boolean mask (query, key)."""
    mask = k_index[:, None, :] <= q_index[:, :, None]
    mask &= q_segment[:, :, None] == k_segment[:, None, :]
    if chunk is not None:
        mask &= (q_pos // chunk)[:, :, None] == (k_pos // chunk)[:, None, :]
    return mask


def chunked_causal_mask(segment_ids: jax.Array, positions: jax.Array, chunk: int | None) -> jax.Array:
    """Self-attention mask of one packed sequence; `chunk=None` is plain (document-) causal."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
    return attention_mask(index, index, positions, positions, segment_ids, segment_ids, chunk)


def causal_mask(segment_ids: jax.Array) -> jax.Array:
    return chunked_causal_mask(segment_ids, jnp.zeros_like(segment_ids), None)
