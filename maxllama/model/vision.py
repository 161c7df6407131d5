"""The early-fusion vision encoder: image tiles -> features at the decoder's width, one row per <|patch|> token.

A ViT over each tile (docs/architecture.md, "Vision encoder"): a bias-free linear over unfolded patches, a
class token appended last, learned positions, LayerNorm before and after pre-norm encoder layers (biased
attention without a mask, 2D rotary embedding, exact-GELU MLP), the class token dropped; then a pixel shuffle
that folds each 2x2 block of patches into one feature of 4x the width, a two-layer GELU adapter and a
bias-free projector to the decoder's width. The layers are stacked and scanned like the decoder's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.config.schema import VisionConfig
from maxllama.model.norm import LayerNorm
from maxllama.model.param import bias, matrix
from maxllama.model.rope import rotate_pairs, vision_rope_angles
from maxllama.model.stack import stacked
from maxllama.parallel.rules import LogicalSharding

CHANNELS = 3


def unfold_patches(pixels: jax.Array, patch: int) -> jax.Array:
    """[T, C, H, W] -> [T, (H/p)(W/p), C p p]: patches in row-major order, each flattened channel-major
    (what torch.nn.Unfold gives)."""
    t, c, h, w = pixels.shape
    x = pixels.reshape(t, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(t, (h // patch) * (w // patch), c * patch * patch)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """[T, g^2, C] -> [T, (g r)^2, C / r^2]: neighbouring patches folded into the channels."""
    t, n, c = x.shape
    g = int(round(n ** 0.5))
    x = x.reshape(t, g, int(g * ratio), int(c / ratio)).transpose(0, 2, 1, 3)
    x = x.reshape(t, int(g * ratio), int(g * ratio), int(c / ratio ** 2)).transpose(0, 2, 1, 3)
    return x.reshape(t, -1, x.shape[-1])


def _linear(rngs, shape, axes, fan_in, dtype, with_bias: bool):
    weight = matrix(rngs, shape, axes, fan_in=fan_in, dtype=dtype)
    out_axes = [a for a in axes if a not in fan_in]
    return weight, (bias([s for s, a in zip(shape, axes) if a in out_axes], out_axes, dtype) if with_bias else None)


class VisionLayer(nnx.Module):
    """h = x + attention(norm(x)); out = h + mlp(norm(h)), every linear map with a bias."""

    def __init__(self, v: VisionConfig, *, param_dtype, sharding: LogicalSharding, rngs: nnx.Rngs):
        d, h, f = v.d_model, v.n_heads, v.d_ff
        hd = d // h
        make = dict(dtype=param_dtype, with_bias=True)
        self.input_layernorm = LayerNorm(d, v.norm_eps, param_dtype)
        self.q, self.q_bias = _linear(rngs, (d, h, hd), ("embed", "heads", "head_dim"), ("embed",), **make)
        self.k, self.k_bias = _linear(rngs, (d, h, hd), ("embed", "heads", "head_dim"), ("embed",), **make)
        self.v, self.v_bias = _linear(rngs, (d, h, hd), ("embed", "heads", "head_dim"), ("embed",), **make)
        self.o, self.o_bias = _linear(rngs, (h, hd, d), ("heads", "head_dim", "embed"), ("heads", "head_dim"), **make)
        self.post_attention_layernorm = LayerNorm(d, v.norm_eps, param_dtype)
        self.fc1, self.fc1_bias = _linear(rngs, (d, f), ("embed", "mlp"), ("embed",), **make)
        self.fc2, self.fc2_bias = _linear(rngs, (f, d), ("mlp", "embed"), ("mlp",), **make)
        self.sharding = sharding

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        dt = x.dtype
        p = lambda param: param.value.astype(dt)  # noqa: E731
        y = self.input_layernorm(x)
        q = jnp.einsum("tnd,dhk->tnhk", y, p(self.q)) + p(self.q_bias)
        k = jnp.einsum("tnd,dhk->tnhk", y, p(self.k)) + p(self.k_bias)
        values = jnp.einsum("tnd,dhk->tnhk", y, p(self.v)) + p(self.v_bias)
        q, k = rotate_pairs(q, angles[None, :, None, :]), rotate_pairs(k, angles[None, :, None, :])
        scores = jnp.einsum("tqhk,tshk->thqs", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
        weights = jax.nn.softmax(scores, axis=-1).astype(dt)
        attended = jnp.einsum("thqs,tshk->tqhk", weights, values)
        h = x + jnp.einsum("tqhk,hkd->tqd", attended, p(self.o)) + p(self.o_bias)
        y = self.post_attention_layernorm(h)
        hidden = jax.nn.gelu(y @ p(self.fc1) + p(self.fc1_bias), approximate=False)
        return h + hidden @ p(self.fc2) + p(self.fc2_bias)


class VisionEncoder(nnx.Module):
    """pixels [T, 3, image_size, image_size] (normalised) -> [T, tokens_per_tile, text_d_model] features."""

    def __init__(self, v: VisionConfig, text_d_model: int, *, param_dtype, compute_dtype,
                 sharding: LogicalSharding, rngs: nnx.Rngs):
        d, n = v.d_model, v.grid ** 2 + 1
        self.cfg = v
        self.compute_dtype = jnp.dtype(compute_dtype)
        make = dict(dtype=param_dtype)
        self.patch_embedding = matrix(rngs, (CHANNELS * v.patch_size ** 2, d), ("patch", "embed"), fan_in=("patch",), **make)
        # Looked up rather than multiplied: their fan-in is the (fixed) token position, like an embedding's.
        self.class_embedding = matrix(rngs, (1, d), ("seq", "embed"), fan_in=("seq",), **make)
        self.positional_embedding = matrix(rngs, (n, d), ("seq", "embed"), fan_in=("seq",), **make)
        self.layernorm_pre = LayerNorm(d, v.norm_eps, param_dtype)
        self.layers = stacked(lambda rngs: VisionLayer(v, param_dtype=param_dtype, sharding=sharding, rngs=rngs),
                              v.n_layers, rngs)
        self.layernorm_post = LayerNorm(d, v.norm_eps, param_dtype)
        shuffled = int(d / v.pixel_shuffle_ratio ** 2)
        self.adapter_fc1 = matrix(rngs, (shuffled, v.projector_dim), ("mlp", "embed"), fan_in=("mlp",), **make)
        self.adapter_fc2 = matrix(rngs, (v.projector_dim, v.projector_dim), ("mlp", "embed"), fan_in=("mlp",), **make)
        self.projector = matrix(rngs, (v.projector_dim, text_d_model), ("mlp", "embed"), fan_in=("mlp",), **make)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        v, dt = self.cfg, self.compute_dtype
        p = lambda param: param.value.astype(dt)  # noqa: E731
        x = unfold_patches(pixels.astype(dt), v.patch_size) @ p(self.patch_embedding)
        x = jnp.concatenate([x, jnp.broadcast_to(p(self.class_embedding), (x.shape[0], 1, x.shape[-1]))], axis=1)
        x = x + p(self.positional_embedding)
        # Sown for the coordinate check (studies/coord_check.py): the tower's coordinates before each norm and
        # after each map that changes width.
        self.sow(nnx.Intermediate, "vision_patches", x)
        x = self.layernorm_pre(x)
        graphdef, state = nnx.split(self.layers)
        angles = jnp.asarray(vision_rope_angles(v.grid, v.d_model // v.n_heads, v.rope_theta))  # a constant

        def body(carry, layer_state):
            return nnx.merge(graphdef, layer_state)(carry, angles), None

        x, _ = jax.lax.scan(body, x, state)
        self.sow(nnx.Intermediate, "vision_layers_out", x)
        x = self.layernorm_post(x)[:, :-1]  # the class token is dropped
        x = pixel_shuffle(x, v.pixel_shuffle_ratio)
        x = jax.nn.gelu(jax.nn.gelu(x @ p(self.adapter_fc1), approximate=False) @ p(self.adapter_fc2), approximate=False)
        self.sow(nnx.Intermediate, "vision_adapter_out", x)
        x = x @ p(self.projector)
        self.sow(nnx.Intermediate, "vision_features", x)
        return x

