import math

import jax.numpy as jnp
import numpy as np
import pytest

from maxllama.config import load_config
from maxllama.config.schema import RopeScalingConfig
from maxllama.model.attention import grouped_query_attention, temperature_scale
from maxllama.model.decoder import layer_kinds
from maxllama.model.masks import causal_mask, chunked_causal_mask
from maxllama.model.rope import apply_rope, rope_frequencies


def brute_force_mask(segments, positions, chunk):
    t = len(segments)
    mask = np.zeros((t, t), bool)
    for q in range(t):
        for k in range(t):
            visible = k <= q and segments[k] == segments[q]
            if chunk is not None:
                visible &= positions[k] // chunk == positions[q] // chunk
            mask[q, k] = visible
    return mask


@pytest.mark.parametrize("chunk", [None, 3, 4])
def test_masks_match_brute_force(chunk):
    segments = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3])
    positions = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0])
    got = chunked_causal_mask(jnp.asarray(segments)[None], jnp.asarray(positions)[None], chunk)[0]
    np.testing.assert_array_equal(np.asarray(got), brute_force_mask(segments, positions, chunk))


def test_chunked_attention_sees_only_its_chunk():
    t, chunk = 16, 4
    mask = np.asarray(chunked_causal_mask(jnp.zeros((1, t), int), jnp.arange(t)[None], chunk)[0])
    assert mask[5].nonzero()[0].tolist() == [4, 5]  # chunk 1 starts at 4
    assert mask[15].sum() == 4
    assert np.asarray(causal_mask(jnp.zeros((1, t), int))[0])[15].sum() == 16


def test_nope_and_moe_layer_selection_follows_the_reference_pattern():
    scout, _ = load_config("experiments/llama4_scout.yaml")
    kinds = layer_kinds(scout.model)
    # HF: no_rope_layers[i] = int((i + 1) % 4 != 0); 1 means RoPE.
    assert [k.use_rope for k in kinds] == [(i + 1) % 4 != 0 for i in range(48)]
    assert all(k.moe for k in kinds)
    maverick, _ = load_config("experiments/llama4_maverick.yaml")
    moe_layers = [i for i, k in enumerate(layer_kinds(maverick.model)) if k.moe]
    assert moe_layers == list(range(1, 48, 2))  # HF: range(step - 1, L, step)
    assert maverick.model.pattern_period == 4 and scout.model.pattern_period == 4


def test_temperature_tuning_values():
    positions = jnp.array([[0, 1, 2, 3, 6, 7, 8190, 8191, 100_000]])
    got = np.asarray(temperature_scale(positions, attn_scale=0.1, floor_scale=8192.0))[0]
    expected = [1 + 0.1 * math.log1p(math.floor((p + 1) / 8192)) for p in positions[0].tolist()]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == 1.0 and got[-3] == 1.0 and got[-2] > 1.0  # 1.0 for short contexts


def reference_llama3_inv_freq(head_dim, theta, factor, low, high, original):
    """One frequency at a time, as the published formula reads."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            out.append(f)
        elif wavelength > original / low:
            out.append(f / factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


@pytest.mark.parametrize("low,high", [(1.0, 1.0), (1.0, 4.0)])
def test_llama3_rope_scaling_matches_formula(low, high):
    scaling = RopeScalingConfig(factor=16.0, low_freq_factor=low, high_freq_factor=high, original_max_position=8)
    got = rope_frequencies(16, 500000.0, scaling)
    expected = reference_llama3_inv_freq(16, 500000.0, 16.0, low, high, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.isfinite(got))
    unscaled = rope_frequencies(16, 500000.0)
    assert (got < unscaled).any()
    if low == high:  # Scout: an empty blend band; short wavelengths kept as they are
        assert (got == unscaled).any()
    else:  # a blend strictly between the scaled and unscaled frequency
        assert ((got > unscaled / 16 * 1.001) & (got < unscaled * 0.999)).any()


def test_interleaved_rope_is_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 2, 9]])
    inv_freq = rope_frequencies(8, 10000.0)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq))
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = z * np.exp(1j * positions[:, :, None, None] * inv_freq)
    expected = np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_grouped_query_attention_matches_per_head_numpy():
    rng = np.random.default_rng(1)
    b, t, h, kv, d = 2, 6, 4, 2, 8
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    mask = np.asarray(chunked_causal_mask(jnp.zeros((b, t), int), jnp.broadcast_to(jnp.arange(t), (b, t)), 4))
    got = np.asarray(grouped_query_attention(*map(jnp.asarray, (q, k, v, mask)), 0.3))
    expected = np.zeros_like(got)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // kv)  # query head hi shares kv head hi // group
            scores = q[bi, :, hi] @ k[bi, :, kh].T * 0.3
            scores = np.where(mask[bi], scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            expected[bi, :, hi] = (w / w.sum(-1, keepdims=True)) @ v[bi, :, kh]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bf16_attention_softmax_stays_finite():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16) * 50
    mask = chunked_causal_mask(jnp.zeros((1, 4), int), jnp.arange(4)[None], None)
    out = grouped_query_attention(q, q, q, mask, 1.0)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))

