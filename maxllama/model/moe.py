"""Llama 4 mixture-of-experts feed-forward.

The router picks the top-k experts per token by logit; the sigmoid of the chosen logits scales each
expert's *input* (not its output; no softmax, no renormalisation); an always-on shared expert is added.
Three dispatches give the same result when no token is dropped: `dense` runs every expert on every token
(unchosen experts see a zero input, hence give zero); `dropless` sorts the token copies by expert and runs
one grouped matmul (`jax.lax.ragged_dot`), doing only the active experts' work; `capacity` gives each
expert a fixed buffer of `capacity_factor * tokens * top_k / experts` slots (static shapes, batched matmuls)
and drops the copies that overflow it, counting them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxllama.config.schema import ModelConfig
from maxllama.metap import Parametrization
from maxllama.model.feedforward import SwiGLU
from maxllama.model.param import matrix


class Routing(NamedTuple):
    logits: jax.Array  # [N, E] fp32 router logits
    experts: jax.Array  # [N, k] chosen expert ids
    scores: jax.Array  # [N, k] sigmoid of the chosen logits: the scale of each expert's input


class MoEStats(NamedTuple):
    load_balance_loss: jax.Array  # Switch-style: E * sum_e (fraction routed to e) * (mean router prob of e)
    router_z_loss: jax.Array  # mean squared log-partition of the router logits
    expert_load: jax.Array  # [E] fraction of token copies routed to each expert
    dropped_fraction: jax.Array  # fraction of token copies that found their expert's buffer full


def route(tokens: jax.Array, router: jax.Array, top_k: int) -> Routing:
    logits = tokens.astype(jnp.float32) @ router.astype(jnp.float32)
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return Routing(logits, experts, jax.nn.sigmoid(top_logits))


def routing_stats(routing: Routing, n_experts: int, dropped_fraction: jax.Array = jnp.zeros(())) -> MoEStats:
    counts = jnp.zeros((n_experts,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
    load = counts / routing.experts.size
    mean_prob = jnp.mean(jax.nn.softmax(routing.logits, axis=-1), axis=0)
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    return MoEStats(n_experts * jnp.sum(load * mean_prob), jnp.mean(z * z), load, dropped_fraction)


def dense_scores(routing: Routing, n_experts: int) -> jax.Array:
    """[N, E] input scale per expert: sigmoid(logit) for chosen experts, 0 elsewhere."""
    n = routing.experts.shape[0]
    return jnp.zeros((n, n_experts), routing.scores.dtype).at[jnp.arange(n)[:, None], routing.experts].set(routing.scores)


NO_DROPS = jnp.zeros((), jnp.float32)


def swiglu_experts(x, gate, up, down, contract: str):
    """SwiGLU of each expert over its own tokens; `contract` names the einsum of x with an [E, D, F] weight."""
    hidden = jax.nn.silu(jnp.einsum(contract, x, gate)) * jnp.einsum(contract, x, up)
    return jnp.einsum(contract, hidden, down)


def experts_dense(tokens, routing, gate, up, down, capacity_factor=None):
    """Reference dispatch: every expert on every token (docs/architecture.md, "Mixture of experts")."""
    del capacity_factor
    scores = dense_scores(routing, gate.shape[0]).astype(tokens.dtype)
    x = tokens[None] * scores.T[:, :, None]  # [E, N, D]
    return swiglu_experts(x, gate, up, down, "end,edf->enf").sum(axis=0), NO_DROPS


def _sorted_copies(tokens, routing):
    """The N*k (token, expert) copies sorted by expert: expert ids, source tokens, inputs scaled by score."""
    k = routing.experts.shape[1]
    flat_experts = routing.experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_copy = order // k
    x = tokens[token_of_copy] * routing.scores.reshape(-1)[order][:, None].astype(tokens.dtype)
    return flat_experts[order], token_of_copy, x


def experts_dropless(tokens, routing, gate, up, down, capacity_factor=None):
    """One grouped matmul per projection over the copies sorted by expert; scatter-add back."""
    del capacity_factor
    experts, token_of_copy, x = _sorted_copies(tokens, routing)
    group_sizes = jnp.bincount(experts, length=gate.shape[0]).astype(jnp.int32)
    hidden = jax.nn.silu(jax.lax.ragged_dot(x, gate, group_sizes)) * jax.lax.ragged_dot(x, up, group_sizes)
    y = jax.lax.ragged_dot(hidden, down, group_sizes)
    return jnp.zeros_like(tokens).at[token_of_copy].add(y), NO_DROPS


def expert_capacity(n_copies: int, n_experts: int, capacity_factor: float) -> int:
    return max(1, int(-(-capacity_factor * n_copies // n_experts)))


def experts_capacity(tokens, routing, gate, up, down, capacity_factor=1.25):
    """Each expert gets `capacity` slots; copies beyond it (latest tokens first) are dropped and counted."""
    n_experts = gate.shape[0]
    experts, token_of_copy, x = _sorted_copies(tokens, routing)
    capacity = expert_capacity(experts.shape[0], n_experts, capacity_factor)
    counts = jnp.bincount(experts, length=n_experts)
    slot = jnp.arange(experts.shape[0]) - (jnp.cumsum(counts) - counts)[experts]  # rank within its expert
    kept = slot < capacity
    buffer = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype).at[experts, slot].set(x, mode="drop")
    y = swiglu_experts(buffer, gate, up, down, "ecd,edf->ecf")
    y = y[experts, jnp.minimum(slot, capacity - 1)] * kept[:, None].astype(y.dtype)
    return jnp.zeros_like(tokens).at[token_of_copy].add(y), 1.0 - jnp.mean(kept.astype(jnp.float32))


DISPATCH = {"dense": experts_dense, "dropless": experts_dropless, "capacity": experts_capacity}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, parametrization: Parametrization, rngs: nnx.Rngs):
        d, f, e = cfg.d_model, cfg.d_ff_expert, cfg.n_experts
        pdt = jnp.dtype(cfg.param_dtype)
        make = dict(dtype=pdt)
        self.router = matrix(rngs, (d, e), ("embed", "expert"), fan_in=("embed",), **make)
        self.gate = matrix(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in=("embed",), **make)
        self.up = matrix(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in=("embed",), **make)
        self.down = matrix(rngs, (e, f, d), ("expert", "mlp", "embed"), fan_in=("mlp",), **make)
        self.shared = (SwiGLU(d, f, param_dtype=pdt, rngs=rngs)
                       if cfg.shared_expert else None)
        self.router_multiplier = parametrization.router_multiplier
        self.top_k = cfg.top_k
        self.dispatch = cfg.moe_dispatch
        self.capacity_factor = cfg.moe_capacity_factor

    def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEStats]:
        dt = x.dtype
        tokens = x.reshape(-1, x.shape[-1])
        routing = route(tokens, self.router.value * self.router_multiplier, self.top_k)
        weights = (self.gate.value.astype(dt), self.up.value.astype(dt), self.down.value.astype(dt))
        out, dropped = DISPATCH[self.dispatch](tokens, routing, *weights, capacity_factor=self.capacity_factor)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(x.shape), routing_stats(routing, self.router.shape[-1], dropped)
