"""Score token arrays (per-sequence mean log-likelihood of each next token, and the full fp32 logits), and
prompts with images: the mean log-likelihood of their text given the image, image-structure tokens unscored
(as the training loss skips them)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.base.errors import UserError
from maxllama.inference.prompts import Prompt, batches
from maxllama.model.build import ModelDef, bind
from maxllama.model.decoder import Images


class Scores(NamedTuple):
    mean_log_likelihood: np.ndarray  # [B] nats per predicted token (T - 1 predictions per sequence)
    logits: np.ndarray | None  # [B, T, V] fp32, when asked for


def load_token_array(path: str, vocab_size: int) -> np.ndarray:
    """A [batch, seq >= 2] integer .npy array of ids in [0, vocab_size); anything else is a UserError naming it."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokens {path}: cannot read a .npy array ({e})") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise UserError(f"--tokens {path}: need a [batch, seq] integer array with seq >= 2, "
                        f"got {tokens.dtype} {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise UserError(f"--tokens {path}: ids must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens


def make_mean_log_likelihood(model: ModelDef) -> Callable:
    """f(params, tokens [B, T], scored [B, T - 1], images) -> (mean log-likelihood of the scored next tokens
    [B], logits [B, T, V])."""

    @jax.jit
    def forward(params, tokens, scored, images: Images | None = None):
        logits = bind(model, params)(tokens, images=images).logits
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        ll = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(ll * scored, axis=-1) / jnp.sum(scored, axis=-1), logits

    return forward


def score(model: ModelDef, params: dict, tokens: np.ndarray, *, batch_size: int = 8,
          keep_logits: bool = False) -> Scores:
    forward = make_mean_log_likelihood(model)
    lls, all_logits = [], []
    for start in range(0, len(tokens), batch_size):
        batch = jnp.asarray(tokens[start:start + batch_size], jnp.int32)
        ll, logits = forward(params, batch, jnp.ones((batch.shape[0], batch.shape[1] - 1), jnp.float32))
        lls.append(np.asarray(ll))
        if keep_logits:
            all_logits.append(np.asarray(logits, np.float32))
    return Scores(np.concatenate(lls), np.concatenate(all_logits) if keep_logits else None)


def score_prompts(model: ModelDef, params: dict, prompts: Sequence[Prompt], image_ids: Sequence[int], *,
                  batch_size: int = 8, progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """[N] mean log-likelihood of each prompt's text tokens (every target that is not one of `image_ids`)."""
    forward = make_mean_log_likelihood(model)
    out = np.zeros(len(prompts), np.float64)
    for indices, batch in batches(prompts, batch_size):
        scored = ~np.isin(batch.tokens[:, 1:], np.asarray(image_ids))
        if not scored.any(axis=-1).all():
            raise UserError("a prompt has no text token to score")
        ll, _ = forward(params, batch.tokens, scored.astype(np.float32), batch.images())
        out[indices] = np.asarray(ll)
        progress(len(indices))
    return out
