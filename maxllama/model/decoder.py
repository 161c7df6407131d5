"""The Llama 4 text decoder: embeddings -> scanned groups of pre-norm blocks -> final norm -> untied head.

The layer pattern (which layers are NoPE, which are MoE) repeats every `pattern_period` layers, so the
decoder stacks whole periods ("groups") along a leading `layers` axis and runs them with one `lax.scan`:
compile time stays flat in depth. Layers left over when the period does not divide the depth form an
unscanned tail group whose layers follow the same pattern.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.config.schema import ModelConfig, VisionConfig
from maxllama.metap import Parametrization
from maxllama.model.attention import Attention, KVCache
from maxllama.model.feedforward import SwiGLU
from maxllama.model.moe import MoE, MoEStats
from maxllama.model.norm import RMSNorm
from maxllama.model.param import matrix
from maxllama.model.stack import stacked
from maxllama.model.vision import VisionEncoder
from maxllama.parallel.rules import LogicalSharding

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole group in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerKind(NamedTuple):
    use_rope: bool  # RoPE + chunked local attention; otherwise NoPE + global attention
    moe: bool


def layer_kinds(cfg: ModelConfig) -> list[LayerKind]:
    return [LayerKind(not cfg.is_nope(i), cfg.is_moe(i)) for i in range(cfg.n_layers)]


class Block(nnx.Module):
    """h = x + attention(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind, *, parametrization: Parametrization,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attention = Attention(cfg, use_rope=kind.use_rope, parametrization=parametrization,
                                   sharding=sharding, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.ffn = (MoE(cfg, parametrization=parametrization, rngs=rngs) if kind.moe else
                    SwiGLU(cfg.d_model, cfg.d_ff, param_dtype=pdt, rngs=rngs))
        self.residual_multiplier = parametrization.residual_multiplier

    def __call__(self, x, positions, segment_ids, cache=None, cache_index=None):
        """-> (output, MoE stats or None, updated KV cache or None)."""
        attended, cache = self.attention(self.attention_norm(x), positions, segment_ids, cache, cache_index)
        h = x + self.residual_multiplier * attended
        ffn_out = self.ffn(self.ffn_norm(h))
        ffn_out, stats = ffn_out if isinstance(self.ffn, MoE) else (ffn_out, None)
        out = h + self.residual_multiplier * ffn_out
        # What the coordinate check measures (unscanned layers): the branches before their residual multiplier,
        # which should stay O(1) in width and depth, and the residual stream. Unused values cost nothing under jit.
        for name, value in (("attention_out", attended), ("ffn_out", ffn_out), ("block_out", out)):
            self.sow(nnx.Intermediate, name, value)
        return out, stats, cache


class LayerGroup(nnx.Module):
    """Consecutive blocks, one pattern period (or the tail); returns the MoE stats of its MoE layers."""

    def __init__(self, cfg: ModelConfig, kinds: Sequence[LayerKind], *, parametrization: Parametrization,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, kind, parametrization=parametrization, sharding=sharding, rngs=rngs)
                                for kind in kinds])
        self.sharding = sharding

    def __call__(self, x, positions, segment_ids, caches=None, cache_index=None):
        """-> (output, MoE stats stacked over its MoE layers or None, per-block KV caches or None)."""
        all_stats, new_caches = [], []
        for i, block in enumerate(self.blocks):
            x, stats, cache = block(x, positions, segment_ids, None if caches is None else caches[i], cache_index)
            x = self.sharding.constrain(x, ("batch", "seq", "embed"))
            new_caches.append(cache)
            if stats is not None:
                all_stats.append(stats)
        stacked = jax.tree.map(lambda *s: jnp.stack(s), *all_stats) if all_stats else None
        return x, stacked, (new_caches if caches is not None else None)


def _stack_groups(cfg, kinds, n_groups, parametrization, sharding, rngs) -> LayerGroup:
    """n_groups identical-shaped groups with parameters stacked on a leading `layers` axis."""
    return stacked(lambda rngs: LayerGroup(cfg, kinds, parametrization=parametrization, sharding=sharding, rngs=rngs),
                   n_groups, rngs)


class Images(NamedTuple):
    """The images of a batch: a static budget of tiles per row and where their features go."""
    pixels: jax.Array  # [B, tiles, 3, image_size, image_size] normalised; a row's unused tiles are blank
    patch_mask: jax.Array  # [B, T] bool: the <|patch|> positions, tokens_per_tile per used tile, in tile order

    @classmethod
    def from_uint8(cls, pixels, patch_mask) -> "Images":
        """From the tiles as the data stores them (uint8): scaled to [-1, 1], mean 0.5 and std 0.5 per channel,
        what the Llama 4 encoder was trained on."""
        return cls((jnp.asarray(pixels, jnp.float32) / 255.0 - 0.5) / 0.5, jnp.asarray(patch_mask))


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    moe: MoEStats | None  # per MoE layer: losses [L_moe], expert_load [L_moe, E]
    cache: dict | None = None  # the updated KV cache when one was passed in


class Decoder(nnx.Module):
    # Where the layers live (scanned groups, unscanned layers, the scanned model's tail): every parameter under
    # one of these sits inside a residual branch; the embedding, final norm and readout do not.
    LAYER_CONTAINERS = ("groups", "unscanned", "tail")

    def __init__(self, cfg: ModelConfig, *, vision: VisionConfig | None = None, parametrization: Parametrization,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        d, v = cfg.d_model, cfg.vocab_size
        self.cfg = cfg
        self.sharding = sharding
        self.embed = matrix(rngs, (v, d), ("vocab", "embed"), fan_in=("vocab",), dtype=pdt)
        kinds = layer_kinds(cfg)
        period = cfg.pattern_period if cfg.scan_layers else 1
        n_groups, n_tail = divmod(cfg.n_layers, period)
        group_args = dict(parametrization=parametrization, sharding=sharding)
        self.groups = (_stack_groups(cfg, kinds[:period], n_groups, rngs=rngs, **group_args)
                       if cfg.scan_layers and n_groups else None)
        self.unscanned = nnx.List(
            [] if cfg.scan_layers else [LayerGroup(cfg, [k], rngs=rngs, **group_args) for k in kinds])
        self.tail = (LayerGroup(cfg, kinds[n_groups * period:], rngs=rngs, **group_args)
                     if cfg.scan_layers and n_tail else None)
        self.final_norm = RMSNorm(d, cfg.norm_eps, pdt)
        self.lm_head = matrix(rngs, (d, v), ("embed", "vocab"), fan_in=("embed",), dtype=pdt)
        self.vision = (VisionEncoder(vision, d, param_dtype=pdt, compute_dtype=cfg.compute_dtype, sharding=sharding,
                                     rngs=rngs) if vision is not None and vision.enabled else None)
        self.embedding_multiplier = parametrization.embedding_multiplier
        self.output_multiplier = parametrization.output_multiplier

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: dict | None = None,
                 images: Images | None = None) -> DecoderOutput:
        """tokens, positions, segment_ids: [B, T] ints. Positions default to 0..T-1, one document per row.

        With `images`, the embeddings at the patch positions are replaced by the vision encoder's features of
        the row's tiles, in order: the k-th patch token of a row takes the k-th feature of its tiles.

        With a `cache` (from `init_cache`), tokens continue the cached sequences at `cache["index"]`: the
        prompt in one call, then one token per call; positions follow the cache.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.compute_dtype)
        cache_index = None if cache is None else cache["index"]
        if positions is None:
            start = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.zeros_like(tokens)
        x = self.embed.value.astype(dt)[tokens] * jnp.asarray(self.embedding_multiplier, dt)
        if images is not None:
            x = self._fuse(x, images)
        x = self.sharding.constrain(x, ("batch", "seq", "embed"))
        self.sow(nnx.Intermediate, "embedding", x)
        stats, new_cache = [], {}
        if self.groups is not None:
            x, group_stats, new_cache["groups"] = self._scan_groups(
                x, positions, segment_ids, None if cache is None else cache["groups"], cache_index)
            stats.append(group_stats)
        new_cache["unscanned"] = []
        for i, group in enumerate(self.unscanned):
            x, group_stats, group_cache = group(x, positions, segment_ids,
                                                None if cache is None else cache["unscanned"][i], cache_index)
            new_cache["unscanned"].append(group_cache)
            stats.append(group_stats)
        if self.tail is not None:
            x, group_stats, new_cache["tail"] = self.tail(x, positions, segment_ids,
                                                          None if cache is None else cache["tail"], cache_index)
            stats.append(group_stats)
        x = self.final_norm(x)
        logits = (x @ self.lm_head.value.astype(dt)).astype(jnp.float32) * self.output_multiplier
        logits = self.sharding.constrain(logits, ("batch", "seq", "vocab"))
        self.sow(nnx.Intermediate, "logits", logits)
        stats = [s for s in stats if s is not None]
        moe = jax.tree.map(lambda *s: jnp.concatenate(s), *stats) if stats else None
        if cache is None:
            return DecoderOutput(logits, moe)
        return DecoderOutput(logits, moe, {**new_cache, "index": cache_index + tokens.shape[1]})

    def _fuse(self, x: jax.Array, images: Images) -> jax.Array:
        """Early fusion, with static shapes: the features of every tile in each row's budget are computed, and
        each patch position gathers its row of them by the running count of patch positions before it."""
        b, tiles = images.pixels.shape[:2]
        features = self.vision(images.pixels.reshape(b * tiles, *images.pixels.shape[2:])).astype(x.dtype)
        features = features.reshape(b, -1, features.shape[-1])  # [B, tiles * tokens_per_tile, D]
        index = jnp.clip(jnp.cumsum(images.patch_mask, axis=1) - 1, 0, features.shape[1] - 1)
        fused = jnp.take_along_axis(features, index[..., None], axis=1)
        return jnp.where(images.patch_mask[..., None], fused, x)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens, shaped like the layer groups."""
        cfg = self.cfg
        shape = (batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)

        def caches(n_blocks: int, lead: tuple[int, ...] = ()) -> list[KVCache]:
            return [KVCache(jnp.zeros(lead + shape, dtype), jnp.zeros(lead + shape, dtype)) for _ in range(n_blocks)]

        cache: dict = {"index": jnp.zeros((), jnp.int32),
                       "unscanned": [caches(len(group.blocks)) for group in self.unscanned]}
        if self.groups is not None:
            n_groups = self.groups.blocks[0].attention_norm.weight.shape[0]
            cache["groups"] = caches(len(self.groups.blocks), (n_groups,))
        if self.tail is not None:
            cache["tail"] = caches(len(self.tail.blocks))
        return cache

    def _scan_groups(self, x, positions, segment_ids, caches, cache_index):
        graphdef, state = nnx.split(self.groups)

        def body(carry, scanned):
            group_state, group_caches = scanned
            out, stats, new_caches = nnx.merge(graphdef, group_state)(carry, positions, segment_ids,
                                                                      group_caches, cache_index)
            return out, (stats, new_caches)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        x, (stats, caches) = jax.lax.scan(body, x, (state, caches))
        # Scanned stats are [groups, moe layers per group, ...]: flatten to one row per MoE layer, in order.
        stats = jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stats) if stats is not None else None
        return x, stats, caches


def in_residual_branch(path: str) -> bool:
    """Whether the parameter at this dotted path ('groups.blocks.0.attention.q') sits in a decoder layer."""
    return path.split(".", 1)[0] in Decoder.LAYER_CONTAINERS
