"""Autoregressive sampling with a KV cache: one forward pass over the prompt, then one token per step.

The cache holds every position; chunked layers mask keys outside the query's chunk exactly as in training,
so cached decoding equals recomputing the whole sequence each step. A prompt's images enter with the prefill:
their features are in the cached keys and values, and the decoded tokens are text.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.inference.prompts import Prompt, batches
from maxllama.model.build import ModelDef, bind
from maxllama.model.decoder import Images


def next_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """[B, V] logits -> [B] tokens: greedy at temperature 0, else nucleus sampling over the smallest set of
    tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token while the mass before it is below top_p: the top token always survives.
        cutoff_index = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def make_generate(model: ModelDef, *, temperature: float = 0.0, top_p: float = 1.0) -> Callable:
    """generate(params, prompt [B, T], max_new_tokens, seed, images) -> [B, T + max_new_tokens] tokens."""

    @jax.jit
    def prefill(params, prompt, cache, images):
        out = bind(model, params)(prompt, cache=cache, images=images)
        return out.logits[:, -1], out.cache

    @jax.jit
    def decode(params, token, cache):
        out = bind(model, params)(token[:, None], cache=cache)
        return out.logits[:, -1], out.cache

    sample = jax.jit(lambda logits, key: next_token(logits, key, temperature, top_p))

    def generate(params, prompt: jax.Array, max_new_tokens: int, seed: int = 0,
                 images: Images | None = None) -> jax.Array:
        batch, prompt_len = prompt.shape
        decoder = bind(model, params)
        cache = decoder.init_cache(batch, prompt_len + max_new_tokens, jnp.dtype(decoder.cfg.compute_dtype))
        logits, cache = prefill(params, prompt, cache, images)
        key = jax.random.key(seed)
        tokens = [prompt]
        for _ in range(max_new_tokens):
            key, step_key = jax.random.split(key)
            token = sample(logits, step_key)
            tokens.append(token[:, None])
            logits, cache = decode(params, token, cache)
        return jnp.concatenate(tokens, axis=1)

    return generate


def generate_all(generate: Callable, params: dict, prompts: Sequence[Prompt], max_new_tokens: int, *,
                 batch_size: int = 8, seed: int = 0, progress: Callable[[int], None] = lambda n: None
                 ) -> list[np.ndarray]:
    """The new tokens of each prompt, in order; prompts run in batches of one length (see `prompts.batches`),
    each batch with its own seed so that equal prompts in two batches draw apart."""
    out: list[np.ndarray] = [np.empty(0, np.int32)] * len(prompts)
    for n, (indices, batch) in enumerate(batches(prompts, batch_size)):
        tokens = generate(params, batch.tokens, max_new_tokens, seed=seed + n, images=batch.images())
        for i, row in zip(indices, np.asarray(tokens[:, batch.tokens.shape[1]:])):
            out[i] = row
        progress(len(indices))
    return out


def completion_text(tokenizer, new_tokens: np.ndarray) -> str:
    """The text of generated tokens up to the first EOS: after it the model starts another document."""
    ends = np.nonzero(np.asarray(new_tokens) == tokenizer.eos_id)[0]
    return tokenizer.decode(new_tokens[:ends[0]] if len(ends) else new_tokens)


def generate_by_recomputation(model: ModelDef, params: dict, prompt: jax.Array, max_new_tokens: int,
                              images: Images | None = None) -> jax.Array:
    """Greedy decoding that re-runs the whole sequence (and its images) every step: the reference the cache
    must match. The sequence lives in a fixed-size buffer (one compilation); causal masking hides the
    unwritten tail, which holds no patch positions."""
    prompt_len = prompt.shape[1]
    buffer = jnp.zeros((prompt.shape[0], prompt_len + max_new_tokens), prompt.dtype).at[:, :prompt_len].set(prompt)
    if images is not None:
        images = images._replace(patch_mask=jnp.pad(jnp.asarray(images.patch_mask), ((0, 0), (0, max_new_tokens))))

    @jax.jit
    def step(params, buffer, position, images):
        logits = bind(model, params)(buffer, images=images).logits
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), position, axis=1)

    for position in range(prompt_len, prompt_len + max_new_tokens):
        buffer = step(params, buffer, position, images)
    return buffer
