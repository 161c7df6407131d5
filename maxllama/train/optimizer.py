"""AdamW as one optax chain, with per-parameter LR and weight-decay multipliers from the parametrization.

clip -> scale_by_adam -> decoupled weight decay (masked per role) -> per-parameter LR multiplier ->
-schedule. The multipliers are static trees built from each parameter's MetaP role, so MetaP changes
numbers, never the structure of the optimizer.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from maxllama.config.schema import Config
from maxllama.metap import Parametrization


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update by its own static multiplier."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: Config, metadata: Mapping[str, Any], parametrization: Parametrization,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
    """`metadata` is a tree shaped like the params whose leaves are dicts with 'role' and 'fan_in'."""
    o = cfg.optim
    is_meta = lambda x: isinstance(x, dict) and "role" in x  # noqa: E731
    lr_multipliers = jax.tree.map(lambda m: parametrization.lr_multiplier(m["role"], m["fan_in"]),
                                  metadata, is_leaf=is_meta)
    decay_mask = jax.tree.map(lambda m: parametrization.weight_decay_multiplier(m["role"]) > 0,
                              metadata, is_leaf=is_meta)
    chain = []
    if cfg.train.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.train.grad_clip))
    chain += [
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        scale_by_tree(lr_multipliers),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*chain)
