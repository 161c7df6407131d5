"""Attention masks from token indices, per-document positions and segment ids.

A query sees a key when the key is not in its future and in the same document; on chunked (local)
layers also only inside its chunk: `pos_k // chunk == pos_q // chunk`. Positions restart at 0 in every
packed document, so chunks are aligned to document starts, as when documents run one by one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, T, T] boolean mask (query, key)."""
    t = segment_ids.shape[-1]
    index = jnp.arange(t)
    causal = index[:, None] >= index[None, :]
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_document


def chunked_causal_mask(segment_ids: jax.Array, positions: jax.Array, chunk: int | None) -> jax.Array:
    """Causal mask further restricted to keys in the query's chunk; `chunk=None` is plain causal."""
    mask = causal_mask(segment_ids)
    if chunk is None:
        return mask
    chunk_id = positions // chunk
    return mask & (chunk_id[:, :, None] == chunk_id[:, None, :])
