"""Score token arrays: per-sequence mean log-likelihood of each next token, and the full fp32 logits."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from maxllama.base.errors import UserError
from maxllama.model.build import ModelDef, bind


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


def score(model: ModelDef, params: dict, tokens: np.ndarray, *, batch_size: int = 8,
          keep_logits: bool = False) -> Scores:
    @jax.jit
    def forward(params, batch):
        logits = bind(model, params)(batch).logits
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        ll = jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(ll, axis=-1), logits

    lls, all_logits = [], []
    for start in range(0, len(tokens), batch_size):
        ll, logits = forward(params, jnp.asarray(tokens[start:start + batch_size], jnp.int32))
        lls.append(np.asarray(ll))
        if keep_logits:
            all_logits.append(np.asarray(logits, np.float32))
    return Scores(np.concatenate(lls), np.concatenate(all_logits) if keep_logits else None)
