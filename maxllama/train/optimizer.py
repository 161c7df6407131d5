"""AdamW as one optax chain whose every per-parameter number comes from the parameter's MetaP rule.

clip (a global norm with per-parameter weights) -> Adam (per-parameter eps) -> decoupled weight decay
(per-parameter rate) -> per-parameter LR multiplier -> -schedule. The rules are static trees, so MetaP changes
numbers, never the structure of the optimizer (or of its checkpointed state: the same moments as optax's Adam).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from maxllama.config.schema import Config
from maxllama.metap import ParamRule

IS_RULE = lambda x: isinstance(x, ParamRule)  # noqa: E731


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update by its own static multiplier."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def rule_field(rules: Any, name: str) -> Any:
    """The tree of one ParamRule field (e.g. 'lr_multiplier', 'clip_weight'), shaped like the params."""
    return jax.tree.map(lambda r: getattr(r, name), rules, is_leaf=IS_RULE)


def weighted_global_norm(grads: Any, weights: Any) -> jax.Array:
    """sqrt(sum_p w_p |g_p|^2): the global norm when every static weight w_p is 1."""
    return jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(lambda g, w: w * jnp.sum(jnp.square(g.astype(jnp.float32))),
                                                     grads, weights))))


def clip_by_weighted_global_norm(max_norm: float, weights: Any) -> optax.GradientTransformation:
    """Scale all gradients by min(1, max_norm / weighted_global_norm): optax.clip_by_global_norm when every
    weight is 1. MetaP sets the weights so the norm means the same at every width."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / weighted_global_norm(updates, weights))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam_per_param_eps(b1: float, b2: float, eps: Any) -> optax.GradientTransformation:
    """optax.scale_by_adam with a tree of eps values (MetaP shrinks eps with each parameter's gradient scale).
    Its state is optax's ScaleByAdamState, so checkpoints do not depend on which eps a run used."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_increment(state.count)
        c1, c2 = 1 - b1 ** count, 1 - b2 ** count
        out = jax.tree.map(lambda m, v, e, g: ((m / c1) / (jnp.sqrt(v / c2) + e)).astype(g.dtype),
                           mu, nu, eps, updates)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def add_decayed_weights_per_param(rates: Any) -> optax.GradientTransformation:
    """u + rate * p with a static rate per parameter (0: no decay)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, p, r: u if r == 0 else u + r * p.astype(u.dtype), updates, params, rates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: Config, rules: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """`rules`: a tree shaped like the params whose leaves are ParamRules (`ModelDef.rules`)."""
    # The chain keeps its length without clipping, so the checkpointed state has one structure whether a
    # run clips or not, and train.grad_clip can change on a resumed run.
    chain = [optax.identity() if cfg.train.grad_clip is None
             else clip_by_weighted_global_norm(cfg.train.grad_clip, rule_field(rules, "clip_weight"))]
    chain += [
        scale_by_adam_per_param_eps(cfg.optim.b1, cfg.optim.b2, rule_field(rules, "adam_eps")),
        add_decayed_weights_per_param(rule_field(rules, "weight_decay")),
        scale_by_tree(rule_field(rules, "lr_multiplier")),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*chain)
