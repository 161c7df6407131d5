import jax
import pytest

from maxllama.model.build import define_model, init_params
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.train.flops import forward_flops_per_token, mean_attended_keys, train_flops_per_token
from maxllama.train.optimizer import build_optimizer
from maxllama.train.peak import table_peak
from maxllama.train.schedules import make_schedule
from maxllama.train.step import init_state, train_step_fn
from tests.conftest import small_config


def test_mean_attended_keys_counts_mask_entries():
    for t, chunk in [(32, None), (32, 8), (30, 8), (8, 16)]:
        by_hand = sum(min(p % chunk if chunk else p, p) + 1 for p in range(t)) / t
        assert mean_attended_keys(t, chunk) == pytest.approx(by_hand)


def test_forward_flops_on_the_small_config_by_hand():
    m = small_config().model  # d 32, 4 heads of 8, 2 kv heads, d_ff 48, 4 experts of 24, top-2, vocab 272
    t = 32
    qkvo = 2 * 32 * (32 + 16 + 16) + 2 * 32 * 32  # 6144
    rope_attention = 4 * 32 * 4.5  # chunk 8: mean keys (1 + ... + 8) / 8 = 4.5
    nope_attention = 4 * 32 * 16.5  # causal over 32: mean keys 33 / 2
    dense = 2 * 3 * 32 * 48  # 9216
    moe = 2 * 32 * 4 + 2 * (2 * 3 * 32 * 24) + 2 * 3 * 32 * 24  # router, top-2 experts, shared
    layers = [qkvo + rope_attention + dense, qkvo + nope_attention + moe] * 2  # layers 0..3
    expected = sum(layers) + 2 * 32 * 272
    assert forward_flops_per_token(m, t) == pytest.approx(expected)
    assert train_flops_per_token(m, t) == pytest.approx(3 * expected)


def test_flop_count_agrees_with_xla_cost_analysis():
    # Attention-heavy (T = 256 against d = 128: the [T, T] scores are 18% of the count) with a vocabulary large
    # enough that the unembedding is another 18%; one dense RoPE layer and one MoE NoPE layer.
    cfg = small_config("model.d_model=128", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=256",
                       "model.d_ff_expert=128", "model.n_layers=2", "model.vocab_size=1024", "train.seq_len=256",
                       "model.attn_chunk=64", "model.moe_dispatch=dense", "train.grad_clip=null",
                       # XLA's cost analysis counts a while-loop body once, whatever its trip count.
                       "model.scan_layers=false")
    sharding = LogicalSharding(build_mesh(cfg.mesh))
    model = define_model(cfg, sharding)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    optimizer = build_optimizer(cfg, model.rules, schedule)
    state = init_state(init_params(cfg, model, sharding), optimizer)
    b, t = 8, cfg.train.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), "int32") for k in ["inputs", "targets", "positions", "segment_ids"]}
    batch["loss_mask"] = jax.ShapeDtypeStruct((b, t), "float32")
    compiled = jax.jit(train_step_fn(cfg, model, optimizer, schedule)).lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    # XLA computes what the program does: full [T, T] scores and, with dense dispatch, every expert.
    ours = train_flops_per_token(cfg.model, t, executed=True) * b * t
    # XLA also counts what the convention leaves out (softmax, norms, the optimizer), never less than the
    # matmuls: measured 1.7% more. Leaving out the unembedding or the attention scores would give +24%.
    gap = (xla_flops - ours) / ours
    print(f"\nXLA counts {gap:+.2%} against ours")
    assert 0 <= gap < 0.03


def test_peak_table_prefers_the_most_specific_name():
    assert table_peak("TPU v5 lite") == 197e12
    assert table_peak("TPU v5p") == 459e12
    assert table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert table_peak("cpu") is None
