import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxllama.metap import parametrization_for
from maxllama.model.moe import (
    MoE,
    dense_scores,
    expert_capacity,
    experts_capacity,
    experts_dense,
    experts_dropless,
    route,
    routing_stats,
)
from tests.conftest import small_config


@pytest.fixture(scope="module")
def moe_and_tokens():
    cfg = small_config()
    moe = MoE(cfg.model, parametrization=parametrization_for(cfg), rngs=nnx.Rngs(3))
    nnx.update(moe, jax.tree.map(lambda w: 0.05 * w, nnx.state(moe, nnx.Param)))  # drawn unit-normal: scale down
    tokens = jax.random.normal(jax.random.key(0), (2, 16, cfg.model.d_model))
    return cfg, moe, tokens


def test_routing_picks_top_k_and_zeroes_the_rest(moe_and_tokens):
    cfg, moe, tokens = moe_and_tokens
    flat = tokens.reshape(-1, tokens.shape[-1])
    routing = route(flat, moe.router.value, cfg.model.top_k)
    scores = np.asarray(dense_scores(routing, cfg.model.n_experts))
    logits = np.asarray(flat @ moe.router.value)
    assert ((scores > 0).sum(axis=1) == cfg.model.top_k).all()  # exactly top_k experts per token
    for row, logit_row in zip(scores, logits):
        chosen = np.argsort(-logit_row)[: cfg.model.top_k]
        np.testing.assert_allclose(row[chosen], 1 / (1 + np.exp(-logit_row[chosen])), rtol=1e-5)
        assert (np.delete(row, chosen) == 0).all()


def test_router_score_scales_expert_input_not_output(moe_and_tokens):
    cfg, moe, tokens = moe_and_tokens
    flat = tokens.reshape(-1, tokens.shape[-1])[:1]
    routing = route(flat, moe.router.value, cfg.model.top_k)
    gate, up, down = moe.gate.value, moe.up.value, moe.down.value
    expected = 0
    for e, s in zip(np.asarray(routing.experts[0]), np.asarray(routing.scores[0])):
        x = flat * s  # SwiGLU is not linear: scaling the input differs from scaling the output
        expected += (jax.nn.silu(x @ gate[e]) * (x @ up[e])) @ down[e]
    np.testing.assert_allclose(experts_dense(flat, routing, gate, up, down)[0], expected, atol=1e-6)


def test_dropless_dispatch_equals_dense_reference(moe_and_tokens):
    cfg, moe, tokens = moe_and_tokens
    flat = tokens.reshape(-1, tokens.shape[-1])
    routing = route(flat, moe.router.value, cfg.model.top_k)
    weights = moe.gate.value, moe.up.value, moe.down.value
    dense, dense_dropped = experts_dense(flat, routing, *weights)
    for dispatch, kwargs in [(experts_dropless, {}), (experts_capacity, {"capacity_factor": cfg.model.n_experts})]:
        out, dropped = dispatch(flat, routing, *weights, **kwargs)  # a capacity that holds every copy: no drops
        np.testing.assert_allclose(out, dense, atol=1e-5)
        assert float(dropped) == 0.0 == float(dense_dropped)


def test_capacity_dispatch_drops_overflow_and_counts_it(moe_and_tokens):
    cfg, moe, tokens = moe_and_tokens
    flat = tokens.reshape(-1, tokens.shape[-1])
    routing = route(flat, moe.router.value, cfg.model.top_k)
    weights = moe.gate.value, moe.up.value, moe.down.value
    factor = 0.5
    out, dropped = experts_capacity(flat, routing, *weights, capacity_factor=factor)
    experts = np.asarray(routing.experts).reshape(-1)  # copy c belongs to token c // k
    capacity = expert_capacity(experts.size, cfg.model.n_experts, factor)
    kept = np.zeros(experts.size, bool)
    for e in range(cfg.model.n_experts):
        kept[np.nonzero(experts == e)[0][:capacity]] = True  # earliest copies win their expert's slots
    assert float(dropped) == pytest.approx(1 - kept.mean()) and 0 < float(dropped) < 1
    kept_scores = routing.scores * jnp.asarray(kept.reshape(routing.scores.shape))
    expected, _ = experts_dense(flat, routing._replace(scores=kept_scores), *weights)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_shared_expert_is_always_on(moe_and_tokens):
    cfg, moe, tokens = moe_and_tokens
    out, _ = moe(tokens)
    routed = experts_dense(tokens.reshape(-1, tokens.shape[-1]),
                           route(tokens.reshape(-1, tokens.shape[-1]), moe.router.value, cfg.model.top_k),
                           moe.gate.value, moe.up.value, moe.down.value)[0]
    np.testing.assert_allclose(out.reshape(-1, out.shape[-1]) - routed, moe.shared(tokens).reshape(routed.shape),
                               atol=1e-5)


def test_balance_loss_is_one_when_balanced_and_higher_when_collapsed():
    n, e = 8, 4
    uniform = route(jnp.eye(n, e) * 0, jnp.zeros((e, e)), 1)._replace(experts=jnp.arange(n)[:, None] % e)
    assert float(routing_stats(uniform, e).load_balance_loss) == pytest.approx(1.0)
    logits = jnp.tile(jnp.array([[5.0, 0, 0, 0]]), (n, 1))
    collapsed = route(jnp.eye(n, e), jnp.zeros((e, e)), 1)._replace(logits=logits, experts=jnp.zeros((n, 1), int))
    stats = routing_stats(collapsed, e)
    assert float(stats.load_balance_loss) > 3.0
    np.testing.assert_allclose(stats.expert_load, [1, 0, 0, 0])
    np.testing.assert_allclose(stats.router_z_loss, jax.nn.logsumexp(logits[0]) ** 2, rtol=1e-6)
