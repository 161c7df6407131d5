"""Shared small shapes so the suite compiles few functions and stays fast."""

import numpy as np
import pytest

from maxllama.config import load_config

# Exercises every layer kind: layers 1 and 3 are NoPE (global), 0 and 2 chunked RoPE; 1 and 3 MoE.
SMALL_MODEL = [
    "model.vocab_size=272", "model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=48", "model.d_ff_expert=24", "model.n_experts=4", "model.top_k=2", "model.moe_every=2",
    "model.nope_every=2", "model.attn_chunk=8", "model.floor_scale=4.0",
    "train.seq_len=32", "train.batch_size=4",
]


def small_config(*overrides: str):
    cfg, _ = load_config(None, [*SMALL_MODEL, *overrides])
    return cfg


@pytest.fixture(scope="session")
def small_cfg():
    return small_config()


def kl_divergence(reference, logits) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) per token, in float64 numpy: in float32 (JAX without
    jax_enable_x64) the sum's rounding alone is ~3e-8 nats, of either sign."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    p, q = log_softmax(reference), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


def compiled_train_step(cfg):
    """(initial state, compiled train step, batch sharding) of `cfg` on one device."""
    from maxllama.model.build import define_model, init_params
    from maxllama.parallel.mesh import build_mesh
    from maxllama.parallel.rules import LogicalSharding
    from maxllama.train.optimizer import build_optimizer
    from maxllama.train.schedules import make_schedule
    from maxllama.train.step import compile_steps, init_state
    sharding = LogicalSharding(build_mesh(cfg.mesh))
    model = define_model(cfg, sharding)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(cfg, model.rules, schedule)
    state = init_state(init_params(cfg, model, sharding), optimizer)
    batch_sharding = sharding.named(("batch", "seq"))
    train_step, _ = compile_steps(cfg, model, optimizer, schedule, state, batch_sharding)
    return state, train_step, batch_sharding
