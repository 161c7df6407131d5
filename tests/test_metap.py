"""MetaP: roles from base shapes, the rules table on hand-computed examples, the optimizer that applies it,
the coordinate check (MetaP flat in width, standard parametrization not) and transfer fitting on synthetic
sweeps with a known optimum."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from maxllama.base.tree import flat_paths
from maxllama.config import ConfigError, load_config
from maxllama.config.loader import dump_config
from maxllama.metap import param_rule, parametrization_for
from maxllama.model.build import define_model, init_params
from maxllama.model.decoder import in_residual_branch
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.train.optimizer import IS_RULE, build_optimizer, clip_by_weighted_global_norm, rule_field
from maxllama.train.schedules import make_schedule
from tests.conftest import small_config

# The small model at 4x the proxy's width and 2x its depth; CompleteP's alpha = 0.5 variant for a
# non-trivial depth exponent; batch 4x and tokens 2x the proxy's, with kappa and beta set.
PROXY = ["metap.parametrization=metap", "metap.base.d_model=8", "metap.base.n_heads=1", "metap.base.n_kv_heads=1",
         "metap.base.head_dim=8", "metap.base.d_ff=12", "metap.base.d_ff_expert=6", "metap.base.n_layers=2",
         "model.head_dim=8"]


def sharding(cfg):
    return LogicalSharding(build_mesh(cfg.mesh))


def rules_of(cfg):
    model = define_model(cfg, sharding(cfg))
    return model, flat_paths(model.rules, is_leaf=IS_RULE)


@pytest.fixture(scope="module")
def metap_model():
    cfg = small_config(*PROXY, "metap.depth_alpha=0.5")
    return (cfg, *rules_of(cfg))


def test_every_parameter_gets_its_role_from_base_shapes(metap_model):
    _, model, rules = metap_model
    roles = {path: rule.role for path, rule in rules.items()}
    assert len(roles) == len(jax.tree.leaves(model.abstract_params))
    assert roles["embed"] == "embedding" and roles["lm_head"] == "readout"
    assert roles["final_norm.weight"] == "vector"
    moe = "groups.blocks.1.ffn."
    assert roles[moe + "router"] == "router"
    for name in ("gate", "up", "down", "shared.gate", "shared.down"):
        assert roles[moe + name] == "hidden"
    for name in ("q", "k", "v", "o"):
        assert roles[f"groups.blocks.0.attention.{name}"] == "hidden"
    assert roles["groups.blocks.0.ffn.down"] == "hidden" and roles["groups.blocks.0.attention_norm.weight"] == "vector"


@pytest.mark.parametrize("layout,container", [("model.n_layers=3", "tail."), ("model.scan_layers=false", "unscanned.")],
                         ids=["scanned+tail", "unscanned"])
def test_only_embedding_final_norm_and_readout_sit_outside_the_residual_branches(layout, container):
    _, rules = rules_of(small_config(*PROXY, layout))
    assert any(path.startswith(container) for path in rules)
    assert {path for path in rules if not in_residual_branch(path)} == {"embed", "final_norm.weight", "lm_head"}


def test_width_ratio_is_each_parameters_own_fan_in_ratio(metap_model):
    _, _, rules = metap_model
    assert rules["groups.blocks.0.attention.q"].ratio == 4  # d_model 32 / 8
    assert rules["groups.blocks.0.attention.o"].ratio == 4  # heads x head_dim: 4 x 8 / 1 x 8
    assert rules["groups.blocks.0.ffn.down"].ratio == 4  # d_ff 48 / 12
    assert rules["groups.blocks.1.ffn.down"].ratio == 4  # d_ff_expert 24 / 6
    assert rules["lm_head"].ratio == 4 and rules["embed"].ratio == 4


def test_rules_match_hand_computed_values(metap_model):
    cfg, model, rules = metap_model
    m, m_L, alpha, lr, wd, eps = 4.0, 2.0, 0.5, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps
    q = rules["groups.blocks.0.attention.q"]
    assert q.init_std == pytest.approx(0.02 / math.sqrt(m))
    assert q.peak_lr(cfg) == pytest.approx(lr / m * m_L ** (alpha - 1))
    assert q.weight_decay == pytest.approx(wd * m) and q.adam_eps == pytest.approx(eps / (m * m_L ** alpha))
    # Inside a residual branch (block norm gains, the router) depth scales LR and eps; outside it does not.
    gain = rules["groups.blocks.0.attention_norm.weight"]
    assert gain.init_std is None and gain.weight_decay == 0
    assert gain.lr_multiplier == pytest.approx(m_L ** (alpha - 1)) and gain.adam_eps == pytest.approx(q.adam_eps)
    final = rules["final_norm.weight"]
    assert final.init_std is None and final.weight_decay == 0
    assert final.lr_multiplier == 1 and final.adam_eps == pytest.approx(eps / m)
    router = rules["groups.blocks.1.ffn.router"]
    assert router.init_std == 0.02 and router.weight_decay == wd
    assert router.lr_multiplier == pytest.approx(m_L ** (alpha - 1)) and router.adam_eps == pytest.approx(q.adam_eps)
    for name in ("lm_head", "embed"):
        assert rules[name].init_std == 0.02 and rules[name].lr_multiplier == 1
        assert rules[name].weight_decay == wd and rules[name].adam_eps == pytest.approx(eps / m)
    # Every non-hidden gradient's squared norm counts m times in the clipping norm; a hidden one's once.
    assert q.clip_weight == 1
    assert {rules[n].clip_weight for n in ("lm_head", "embed", "final_norm.weight")} == {m}
    assert router.clip_weight == m and gain.clip_weight == m
    p = model.parametrization
    assert p.output_multiplier == pytest.approx(1 / m) and p.router_multiplier == pytest.approx(1 / m)
    assert p.residual_multiplier == pytest.approx(m_L ** -alpha)
    assert p.attention_scale == pytest.approx(math.sqrt(8) / 8)  # alpha_attn = sqrt(proxy head_dim), / head_dim


def test_every_width_exponent_is_configurable():
    cfg = small_config(*PROXY, "metap.exponents.hidden_init=1.0", "metap.exponents.hidden_lr=0.5",
                       "metap.exponents.output=0.5", "metap.exponents.eps=0.0", "metap.exponents.attention=0.5",
                       "metap.exponents.embedding_lr=0.5", "metap.exponents.clip_norm=0.5")
    assert param_rule(cfg, "embedding", 4.0, in_branch=False).lr_multiplier == pytest.approx(1 / 2)
    assert param_rule(cfg, "readout", 4.0, in_branch=False).clip_weight == pytest.approx(2)
    rule = param_rule(cfg, "hidden", 4.0, in_branch=True)
    assert rule.init_std == pytest.approx(0.02 / 4) and rule.lr_multiplier == pytest.approx(1 / 2)
    assert rule.weight_decay == pytest.approx(cfg.optim.weight_decay * 2)
    assert rule.adam_eps == pytest.approx(cfg.optim.eps / 2)  # width no longer shrinks it; depth (m_L = 2) still does
    p = parametrization_for(cfg)
    assert p.output_multiplier == pytest.approx(0.5) and p.attention_scale == pytest.approx(8 ** -0.5)


def test_weight_decay_is_set_per_group():
    """Weight decay on the hidden matrices alone (muP's matrix-like parameters), none on the vector-like ones."""
    cfg = small_config(*PROXY, "optim.weight_decay=0.5", "metap.wd_embedding=0", "metap.wd_readout=0",
                       "metap.wd_router=0.5", "metap.wd_hidden=2")
    assert param_rule(cfg, "embedding", 4.0, in_branch=False).weight_decay == 0
    assert param_rule(cfg, "readout", 4.0, in_branch=False).weight_decay == 0
    assert param_rule(cfg, "router", 4.0, in_branch=True).weight_decay == pytest.approx(0.25)
    assert param_rule(cfg, "hidden", 4.0, in_branch=True).weight_decay == pytest.approx(0.5 * 2 * 4)
    assert param_rule(cfg, "vector", 4.0, in_branch=True).weight_decay == 0


def test_batch_and_horizon_exponents_and_adamw_timescale():
    cfg = small_config(*PROXY, "metap.base.batch_size=1", "metap.base.tokens=4000", "train.steps=250",
                       "metap.kappa=0.5", "metap.beta=0.3", "metap.weight_decay_timescale=true")
    # batch 4 / 1; tokens 250 x 4 x 32 = 32000 = 8 x 4000.
    factor = 4 ** 0.5 * 8 ** -0.3
    rule = param_rule(cfg, "readout", 4.0, in_branch=False)
    assert rule.lr_multiplier == pytest.approx(factor)
    assert rule.weight_decay == pytest.approx(cfg.optim.weight_decay * 4 / (factor * 8))  # B / (lr wd D) kept


def test_metap_at_the_proxy_is_standard_parametrization():
    """With every ratio 1 and default constants, MetaP gives the proxy exactly what SP gives it."""
    sp_model, sp = rules_of(small_config())
    mp_model, mp = rules_of(small_config("metap.parametrization=metap"))
    assert sp == {k: v for k, v in mp.items()}
    assert sp_model.parametrization.attention_scale == pytest.approx(mp_model.parametrization.attention_scale)
    assert mp_model.parametrization.output_multiplier == 1 and mp_model.parametrization.residual_multiplier == 1


def test_standard_parametrization_is_one_std_one_lr():
    _, rules = rules_of(small_config("metap.init_std=0.05"))
    matrices = [r for r in rules.values() if r.role != "vector"]
    assert {r.init_std for r in matrices} == {0.05} and {r.lr_multiplier for r in rules.values()} == {1.0}
    assert {r.weight_decay for r in rules.values() if r.role == "vector"} == {0.0}


def test_init_params_draw_each_parameter_at_its_init_std(metap_model):
    cfg, model, rules = metap_model
    params = flat_paths(init_params(cfg, model, sharding(cfg)))
    for path in ("groups.blocks.0.ffn.gate", "groups.blocks.1.ffn.up", "lm_head", "embed"):
        assert float(np.std(params[path])) == pytest.approx(rules[path].init_std, rel=0.1), path
    assert float(np.abs(params["final_norm.weight"] - 1).max()) == 0
    zero_q = small_config(*PROXY, "metap.zero_init_query=true")
    q = flat_paths(init_params(zero_q, define_model(zero_q, sharding(zero_q)), sharding(zero_q)))
    assert float(np.abs(q["groups.blocks.0.attention.q"]).max()) == 0


def test_optimizer_applies_per_parameter_eps_decay_and_lr(metap_model):
    """One step from fresh moments, checked against the AdamW formula written out in numpy."""
    cfg, model, rules = metap_model
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), model.abstract_params)
    grads = jax.tree.map(lambda s: jnp.full(s.shape, 3e-9, s.dtype), model.abstract_params)  # eps-sized
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_clip": None})})
    schedule = make_schedule(cfg.optim.model_copy(update={"schedule": "constant", "warmup_steps": 0}), 10)
    opt = build_optimizer(cfg, model.rules, schedule)
    updates = flat_paths(opt.update(grads, opt.init(params), params)[0])
    for path in ("groups.blocks.0.attention.q", "lm_head", "final_norm.weight"):
        r = rules[path]
        g = 3e-9
        expected = -cfg.optim.lr * r.lr_multiplier * (g / (g + r.adam_eps) + r.weight_decay * 0.5)
        assert float(updates[path].ravel()[0]) == pytest.approx(expected, rel=1e-5), path


def test_clipping_bounds_the_weighted_norm(metap_model):
    """Gradients of norm 1 per parameter: the clip scales them all by grad_clip / sqrt(sum of the weights)."""
    cfg, model, rules = metap_model
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.abstract_params)
    grads = jax.tree.map(lambda s: jnp.full(s.shape, 1 / math.sqrt(math.prod(s.shape)), s.dtype), model.abstract_params)
    clip = clip_by_weighted_global_norm(cfg.train.grad_clip, rule_field(model.rules, "clip_weight"))
    clipped = flat_paths(clip.update(grads, clip.init(params), params)[0])
    scale = cfg.train.grad_clip / math.sqrt(sum(r.clip_weight for r in rules.values()))
    assert sum(r.clip_weight != 1 for r in rules.values()) >= 5  # the weights are not all 1 here
    for path, g in clipped.items():
        np.testing.assert_allclose(g, flat_paths(grads)[path] * scale, rtol=1e-6)


def test_metaps_clipping_norm_keeps_the_proxys_value_across_width():
    """The measured claim behind the clip weights: at init the proxy's plain global norm falls by 40% at 8x its
    width (the embedding's and readout's gradients shrink as m^-1/2); the weighted norm stays within 20%."""
    from maxllama.data.pipeline import build_datasets
    from maxllama.model.build import bind, initializer
    from maxllama.studies.coord_check import ladder_config
    from maxllama.train.loss import training_loss
    proxy, _ = load_config("experiments/metap/proxy.yaml", ["train.batch_size=4", "train.seq_len=32"])
    batch = build_datasets(proxy).train[0]
    norms = {}
    for width in (32, 256):
        cfg = ladder_config(proxy, "width", width, 32, "metap", 1, 4e-3)
        model = define_model(cfg, sharding(cfg))
        loss = lambda p: training_loss(bind(model, p)(batch["inputs"], batch["positions"], batch["segment_ids"]),  # noqa: E731
                                       batch, cfg.train)[0]
        grads = jax.jit(jax.grad(loss))(initializer(cfg, model, sharding(cfg))(0))
        sq = [float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads)]
        weights = [r.clip_weight for r in jax.tree.leaves(model.rules, is_leaf=IS_RULE)]
        norms[width] = math.sqrt(sum(sq)), math.sqrt(sum(w * s for w, s in zip(weights, sq)))
    plain, weighted = (norms[256][i] / norms[32][i] for i in (0, 1))
    assert plain < 0.75 and 0.8 < weighted < 1.2, (plain, weighted)


def test_optimizer_equals_optax_adamw_under_standard_parametrization():
    cfg = small_config("train.grad_clip=0.5", "optim.weight_decay=0.1")
    model = define_model(cfg, sharding(cfg))
    params = init_params(cfg, model, sharding(cfg))
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    assert float(optax.global_norm(grads)) > 0.5  # the clip acts
    schedule = make_schedule(cfg.optim, 100)
    ours = build_optimizer(cfg, model.rules, schedule)
    mask = jax.tree.map(lambda r: r.role != "vector", model.rules, is_leaf=IS_RULE)
    reference = optax.chain(optax.clip_by_global_norm(0.5),
                            optax.adamw(schedule, b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps,
                                        weight_decay=cfg.optim.weight_decay, mask=mask))
    s1, s2 = ours.init(params), reference.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = reference.update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-12)


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_coordinate_check_is_flat_under_metap_and_grows_under_sp():
    from maxllama.studies.coord_check import coord_check
    cfg, _ = load_config("experiments/metap/proxy.yaml", ["train.batch_size=4", "train.seq_len=32", "metap.sigma_readout=0.005"])
    slopes = {}
    for param in ("metap", "standard"):
        check = coord_check(cfg, "width", [32, 64, 128], param, seeds=(0,), steps=3, lr=4e-3)
        hidden = {m: s for m, s in check.slopes.items() if m != "embedding"}
        slopes[param] = np.array([s[2:] for s in hidden.values()])
    assert np.abs(slopes["metap"]).max() < 0.25, slopes["metap"]  # 3 narrow widths, 1 seed: the full check is 0.1
    assert slopes["standard"].min() > 0.5, slopes["standard"]  # SP: activations grow with width


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow` (CI runs it)
def test_vision_coordinate_check_is_flat_under_metap_and_grows_under_sp(tmp_path):
    from PIL import Image

    from maxllama.studies.coord_check import coord_check
    rng = np.random.default_rng(0)
    with open(tmp_path / "captions.jsonl", "w") as captions:
        for i in range(160):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            captions.write(json.dumps({"image": f"{i}.png", "text": f"digit: {i % 10}"}) + "\n")
    cfg, _ = load_config("experiments/multimodal/small_digits.yaml", [
        f"data.sources=[{{path: {tmp_path / 'captions.jsonl'}, format: image_caption}}]", "train.batch_size=4",
        "metap.sigma_readout=0.005", "metap.lr_readout=1"])
    slopes = {}
    for param in ("metap", "standard"):
        # Judged from step 4, as `make metap-coord` does: the projected features' init part shrinks by design.
        check = coord_check(cfg, "vision_width", [32, 64, 128], param, seeds=(0,), steps=5, lr=4e-3)
        assert {"vision_patches", "vision_layers_out", "vision_adapter_out", "vision_features"} <= set(check.slopes)
        slopes[param] = {m: np.array(s[4:]) for m, s in check.slopes.items()}
    assert max(np.abs(s).max() for s in slopes["metap"].values()) < 0.2, slopes["metap"]  # the full check: 0.1
    assert slopes["standard"]["vision_features"].min() > 1.0, slopes["standard"]  # SP: they grow with width


def test_slope_errors_are_the_spread_of_each_seeds_own_fit():
    from maxllama.studies.coord_check import CoordCheck, slope_errors
    widths = [32, 64, 128]
    seed = lambda slope: {"h": [[2.0 ** (slope * k) for k in range(3)]]}  # noqa: E731  one step, a power law
    errors = slope_errors(widths, [seed(0.1), seed(0.3), seed(0.2)])
    assert errors["h"][0] == pytest.approx(0.1 / math.sqrt(3))  # std(0.1, 0.3, 0.2; ddof 1) = 0.1, over sqrt(3)
    assert slope_errors(widths, [seed(0.1)]) is None
    check = CoordCheck("width", "metap", widths, {"h": [[1.0, 1.0, 1.0]]}, {"h": [0.2]}, errors, 0.1, 0)
    assert "+0.200 ±0.058" in check.table() and "FAIL" in check.table()


def test_coordinate_check_seeds_share_one_compile_but_not_their_init():
    from maxllama.data.pipeline import build_datasets
    from maxllama.studies.coord_check import ladder_config, measure
    cfg, _ = load_config("experiments/metap/proxy.yaml", ["train.batch_size=4", "train.seq_len=32"])
    rung = ladder_config(cfg, "width", 32, 32, "metap", steps=2, lr=4e-3)
    batch = build_datasets(rung).train[0]
    both = list(measure(rung, batch, False, (0, 1)))
    assert both[1] == next(measure(rung, batch, False, (1,)))  # seed 1 after seed 0 = seed 1 alone
    assert both[0] != both[1]

# ---- transfer on synthetic sweeps ----

def synthetic_sweep(tmp_path, budgets, lr_opt, seeds=(0, 1), lrs=None, noise=0.0, seed_offset=0.0):
    """A finished sweep whose final loss is a parabola in log2 LR around lr_opt(batch, steps), plus independent
    noise per run and a shift of seed_offset x seed that every run of a seed shares (its init and data luck)."""
    proxy, _ = load_config("experiments/metap/proxy.yaml")
    lrs = lrs or [2.0 ** k for k in range(-11, -3)]
    rng = np.random.default_rng(0)
    runs, swept = {}, ["optim.lr", "seed"] + (["train.batch_size", "train.steps"] if len(budgets) > 1 else [])
    for batch, steps in budgets:
        for lr in lrs:
            for seed in seeds:
                overrides = {"optim.lr": lr, "seed": seed}
                if len(budgets) > 1:
                    overrides |= {"train.batch_size": batch, "train.steps": steps}
                name = f"b{batch}_s{steps}_lr{lr:g}_seed{seed}"
                loss = (2.0 + 0.05 * (math.log2(lr) - math.log2(lr_opt(batch, steps))) ** 2 + noise * rng.normal()
                        + seed_offset * seed)
                d = tmp_path / "runs" / name
                d.mkdir(parents=True)
                (d / "metrics.jsonl").write_text(json.dumps({"step": steps, "loss": loss, "val_loss": loss}) + "\n")
                cfg = proxy.model_copy(update={"train": proxy.train.model_copy(update={"batch_size": batch, "steps": steps})})
                (d / "config.yaml").write_text(dump_config(cfg))
                runs[name] = {"overrides": overrides, "status": "done"}
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "s.yaml", "base": "b.yaml", "swept": swept, "runs": runs}))
    return tmp_path


def test_transfer_finds_a_known_optimum_and_exponents(tmp_path):
    from maxllama.studies.transfer import transfer
    lr0, kappa, beta = 3e-3, 0.5, 0.3
    budgets = [(8, 600), (16, 300), (32, 150), (8, 1200), (8, 2400)]  # batch at fixed tokens; horizon at fixed batch
    truth = lambda b, s: lr0 * (b / 8) ** kappa * (b * s / 4800) ** -beta  # noqa: E731
    result = transfer(synthetic_sweep(tmp_path, budgets, truth, noise=0.002))
    assert math.log2(result.fits["optim.lr"].optimum) == pytest.approx(math.log2(lr0), abs=0.1)
    assert result.kappa == pytest.approx(kappa, abs=0.1) and result.beta == pytest.approx(beta, abs=0.1)
    config = result.config()
    assert config["metap.base.batch_size"] == 8 and config["metap.base.tokens"] == 600 * 8 * 64
    assert config["metap.base.d_model"] == 32 and config["metap.parametrization"] == "metap"
    assert not [w for w in result.warnings if "edge" in w]


def test_transfer_warns_at_the_edge_and_with_one_seed(tmp_path):
    from maxllama.studies.transfer import transfer
    result = transfer(synthetic_sweep(tmp_path, [(8, 600)], lambda b, s: 2.0 ** -3, seeds=(0,)))
    assert any("edge of the swept range" in w for w in result.warnings)
    assert any("single seed" in w for w in result.warnings)


def test_transfer_cli_writes_metap_yaml_that_a_target_loads(tmp_path):
    sweep = synthetic_sweep(tmp_path / "sweep", [(8, 600)], lambda b, s: 3e-3)
    out = tmp_path / "metap.yaml"
    result = subprocess.run([sys.executable, "-m", "maxllama", "metap", "transfer", str(sweep), "--out", str(out),
                             "--target", "experiments/metap/proxy.yaml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "optim.lr: optimum 0.003" in result.stdout and "hidden" in result.stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["target"]["parametrization"] == "metap"
    # The target's table, written before metap.yaml existed, is the one the written file gives the target.
    from maxllama.metap import table
    from maxllama.model.build import define_abstract
    target, _ = load_config("experiments/metap/proxy.yaml", [f"metap.from={out}"])
    assert doc["target"] == yaml.safe_load(yaml.safe_dump(table.summary(target, define_abstract(target))))
    cfg, origins = load_config("experiments/metap/proxy.yaml",
                               [f"metap.from={out}", "model.d_model=128", "model.n_heads=8", "model.n_kv_heads=8"])
    assert cfg.optim.lr == pytest.approx(3e-3, rel=0.02) and origins["optim.lr"].startswith("metap.from")
    assert cfg.metap.base.d_model == 32 and cfg.model.d_model == 128
    override, _ = load_config("experiments/metap/proxy.yaml", [f"metap.from={out}", "optim.lr=0.5"])
    assert override.optim.lr == 0.5  # the command line still wins


def test_metap_from_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="metap.from: file not found"):
        load_config("experiments/metap/proxy.yaml", ["metap.from=no/such/metap.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("fits: {}\n")
    with pytest.raises(ConfigError, match="has no 'config:' mapping"):
        load_config("experiments/metap/proxy.yaml", [f"metap.from={bad}"])
    with pytest.raises(ConfigError, match="metap.base.n_kv_heads"):
        load_config(None, ["metap.base.n_heads=3", "metap.base.n_kv_heads=2"])


def test_metap_show_prints_every_group():
    result = subprocess.run([sys.executable, "-m", "maxllama", "metap", "show", "experiments/metap/proxy.yaml",
                             "model.d_model=128", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff=512",
                             "model.d_ff_expert=256", "--parameters"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ratios to the proxy: width 4" in result.stdout
    for group in ("embedding", "hidden m=4", "readout", "router", "vector"):
        assert group in result.stdout
    assert "output 0.25" in result.stdout and "lm_head" in result.stdout


def drift_sweep(path, optimum, seeds, hparam="optim.lr", params=("standard", "metap"), widths=(32, 64, 128)):
    """A sweep directory of quadratic loss-vs-log2(LR) curves: optimum(param, d, seed) -> log2 LR*, seeds(d)."""
    runs = {}
    for param in params:
        for d in widths:
            for lr in [2.0 ** k for k in range(-12, -2)]:
                for seed in seeds(d):
                    loss = 2.0 + 0.04 * (math.log2(lr) - optimum(param, d, seed)) ** 2
                    name = f"{param}_d{d}_lr{lr:g}_s{seed}"
                    (path / "runs" / name).mkdir(parents=True)
                    (path / "runs" / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": loss}))
                    runs[name] = {"overrides": {"metap.parametrization": param, "model.d_model": d, hparam: lr,
                                                "seed": seed}, "status": "done"}
    (path / "sweep.json").write_text(json.dumps({"swept": ["metap.parametrization", "model.d_model", hparam, "seed"],
                                                 "runs": runs}))
    return path


@pytest.mark.parametrize("hparam", ["optim.lr", "metap.lr_readout"])
def test_drift_measures_how_far_the_optimum_moves(tmp_path, hparam):
    """SP-like curves whose optimum halves per doubling of width, MetaP-like ones whose optimum stays put (its two
    seeds' optima an octave apart, the other way round at width 64: the mean curve does not move, but seed
    resamples of it do)."""
    from maxllama.studies.drift import report

    def optimum(param, d, seed):
        if param == "standard":
            return math.log2(4e-3) - math.log2(d / 32)
        return math.log2(4e-3) + (seed - 0.5) * (-1 if d == 64 else 1)

    drift_sweep(tmp_path, optimum, lambda d: (0, 1), hparam)
    text, png, js = report([tmp_path], "model.d_model", "metap.parametrization", hparam=hparam)
    assert f"model.d_model=32: {hparam}* 0.004" in text
    groups = {g["group"]: g for g in json.loads(js.read_text())["groups"]}
    assert groups["metap.parametrization=metap"]["drift_log2"] == pytest.approx(0.0, abs=0.02)
    assert groups["metap.parametrization=standard"]["drift_log2"] == pytest.approx(2.0, abs=0.02)
    assert groups["metap.parametrization=standard"]["slope_per_doubling"] == pytest.approx(-1.0, abs=0.02)
    assert png.exists() and "drift 2.000 log2" in text
    # Resampling seeds (whole, at every width at once): one seed drawn twice, with probability 1/2, puts width 64
    # an octave from the others; both seeds drawn leave the curves where they are.
    low, high = groups["metap.parametrization=metap"]["drift_log2_seed_resamples_16_84"]
    assert low == pytest.approx(0.0, abs=1e-6) and high == pytest.approx(1.0, abs=1e-6)
    assert groups["metap.parametrization=standard"]["drift_log2_seed_resamples_16_84"] == pytest.approx([2.0, 2.0], abs=0.02)
    # At the proxy's LR* the standard curve 4x wider is 2 octaves off its optimum: 0.04 * 2^2 / 2.0 = 8% worse
    # (a little more: interpolated between grid points); the MetaP curves lose nothing.
    assert groups["metap.parametrization=standard"]["curves"][-1]["loss_penalty_at_proxy_lr"] == pytest.approx(0.08, abs=0.003)
    assert max(c["loss_penalty_at_proxy_lr"] for c in groups["metap.parametrization=metap"]["curves"]) < 0.002
    assert groups["metap.parametrization=metap"]["drift_log2_common_seeds"] is None  # every width ran seeds 0, 1
    # A pooled sweep that does not vary the scaled key has no place on its axis: refused, by name.
    (tmp_path / "one_width").mkdir()
    (tmp_path / "one_width" / "sweep.json").write_text(json.dumps({"swept": [hparam, "seed"], "runs": {}}))
    with pytest.raises(ConfigError, match="one_width: 'model.d_model' is not swept"):
        report([tmp_path, tmp_path / "one_width"], "model.d_model", "metap.parametrization", hparam=hparam)


def test_drift_compares_curves_on_the_seeds_they_all_ran(tmp_path):
    """No true drift, but each seed's luck moves every width alike, and width 32 ran two luckier seeds more: the
    pooled optima drift 0.5 octave, the common seeds' not at all, and no resample of shared luck makes any."""
    from maxllama.studies.drift import report
    luck = {0: -0.5, 1: 0.0, 2: 0.5, 3: 1.0}
    drift_sweep(tmp_path, lambda param, d, seed: -8 + luck[seed], lambda d: (0, 1, 2, 3) if d == 32 else (0, 1),
                params=("metap",))
    text, _, js = report([tmp_path], "model.d_model", "metap.parametrization")
    (group,) = json.loads(js.read_text())["groups"]
    assert group["drift_log2"] == pytest.approx(0.5, abs=1e-6)
    assert group["common_seeds"] == [0, 1] and group["drift_log2_common_seeds"] == pytest.approx(0.0, abs=1e-6)
    assert group["log2_lr_opt_common_seeds"] == pytest.approx([-8.25] * 3, abs=1e-6)
    assert "on the seeds every model.d_model ran (0, 1): drift 0.000" in text
    assert "averaged different seeds" in text


def test_drift_slope_tells_a_trend_from_scatter(tmp_path):
    """Optima that scatter by an octave around one value (a seed's luck differs from width to width), the same
    scatter on a trend of -1/4 per doubling, and optima that stay put but for one beyond the swept LRs. The spread
    of the optima does not tell the first two apart; the slope and its range over seed resamples do, and an
    optimum at the edge of its range, a bound rather than a value, is left out of the slope."""
    from maxllama.studies.drift import report
    widths = (32, 64, 128, 256, 512)
    scatter = dict(zip(widths, (0.0, 0.5, -0.5, 0.5, 0.0)))  # the mean optima's: no trend
    luck = {0: -0.4, 1: 0.4, 2: -0.2, 3: 0.2}  # each seed's, in or against the sign of the width's
    sign = dict(zip(widths, (1, -1, -1, 1, 1)))

    def optimum(param, d, seed):
        doublings = math.log2(d / 32)
        if param == "edge":
            return -14.0 if d == 512 else -8.0
        own = scatter[d] + luck[seed] * sign[d]
        return -8.0 + own - (0.25 * doublings if param == "trend" else 0.0)

    drift_sweep(tmp_path, optimum, lambda d: (0, 1, 2, 3), params=("scatter", "trend", "edge"), widths=widths)
    text, _, js = report([tmp_path], "model.d_model", "metap.parametrization")
    groups = {g["group"].split("=")[1]: g for g in json.loads(js.read_text())["groups"]}
    assert groups["scatter"]["drift_log2"] == pytest.approx(1.0, abs=1e-6)
    assert groups["scatter"]["slope_per_doubling"] == pytest.approx(0.0, abs=1e-6)
    low, high = groups["scatter"]["slope_per_doubling_seed_resamples"]["2.5_97.5"]
    assert -0.15 < low < -0.02 and 0.02 < high < 0.15  # a resample's mean luck, up to 0.4, times 2/10 per doubling
    assert groups["trend"]["slope_per_doubling"] == pytest.approx(-0.25, abs=1e-6)
    assert groups["trend"]["trend_log2"] == pytest.approx(-1.0, abs=1e-6)
    assert groups["trend"]["slope_per_doubling_seed_resamples"]["2.5_97.5"][1] < 0
    assert "slope -0.250 per doubling" in text and "a trend of -1.00 log2" in text
    assert groups["edge"]["drift_log2"] == pytest.approx(4.0, abs=1e-6)  # clipped at the lowest LR, 2^-12
    assert groups["edge"]["slope_per_doubling"] == pytest.approx(0.0, abs=1e-6)


def test_regret_compares_the_transferred_run_with_the_best_direct_point(tmp_path):
    from maxllama.studies.regret import regret
    direct = synthetic_sweep(tmp_path / "direct", [(8, 600)], lambda b, s: 2.0 ** -8)  # best loss 2.0 at 2^-8
    transferred = synthetic_sweep(tmp_path / "transferred", [(8, 600)], lambda b, s: 2.0 ** -8,
                                  lrs=[2.0 ** -7])  # one LR step off the optimum: loss 2.05
    text, result = regret(transferred, direct, [direct])
    assert result["regret"] == pytest.approx(0.05 / 2.0, rel=1e-6)
    assert result["direct_best_loss"] == pytest.approx(2.0) and result["direct_sweep_cost_in_target_runs"] == 16
    assert "regret: +2.50%" in text and (transferred / "regret.png").exists()
    assert result["regret_standard_error"] == pytest.approx(0.0)  # noiseless seeds
    # Seed noise of 0.02 per run: the spread over 8 LRs x 8 seeds recovers it, and the regret's standard error
    # is that of a difference of two 8-seed means, std * sqrt(2/8), relative to the best loss (about 0.5%).
    # The transferred runs use other seeds here, so nothing pairs them with the direct ones.
    noisy = synthetic_sweep(tmp_path / "noisy", [(8, 600)], lambda b, s: 2.0 ** -8, seeds=range(8), noise=0.02)
    once = synthetic_sweep(tmp_path / "once", [(8, 600)], lambda b, s: 2.0 ** -8, seeds=range(8, 16), lrs=[2.0 ** -8])
    _, result = regret(once, noisy)
    assert result["direct_seed_std"] == pytest.approx(0.02, rel=0.2) and result["paired_seeds"] == 0
    assert result["regret_standard_error"] == pytest.approx(
        result["direct_seed_std"] * 0.5 / result["direct_best_loss"], rel=1e-6)


def test_regret_pairs_seeds_so_a_seeds_luck_cancels(tmp_path):
    """Each seed shifts all its runs by 0.03 x seed: a large spread between seeds, none between a seed's
    transferred run and its run at the best direct LR, so the paired standard error is zero."""
    from maxllama.studies.regret import regret
    kwargs = dict(seeds=range(4), seed_offset=0.03)
    direct = synthetic_sweep(tmp_path / "direct", [(8, 600)], lambda b, s: 2.0 ** -8, **kwargs)
    transferred = synthetic_sweep(tmp_path / "transferred", [(8, 600)], lambda b, s: 2.0 ** -8, lrs=[2.0 ** -8],
                                  **kwargs)
    text, result = regret(transferred, direct)
    assert result["direct_seed_std"] == pytest.approx(0.03 * np.std(range(4), ddof=1), rel=1e-6)
    assert result["paired_seeds"] == 4 and result["regret"] == pytest.approx(0.0, abs=1e-9)
    assert result["regret_standard_error"] == pytest.approx(0.0, abs=1e-9) and "4 paired seeds" in text


def test_transfer_fits_the_lr_and_a_per_group_constant_together(tmp_path):
    """A grid over the LR and the readout's LR multiplier, loss a bowl around (2^-8, 8): each is fitted at the
    best value of the other, and both go into the target's config."""
    from maxllama.studies.transfer import transfer
    proxy, _ = load_config("experiments/metap/proxy.yaml")
    runs = {}
    for lr in [2.0 ** k for k in range(-11, -5)]:
        for c_out in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]:
            for seed in (0, 1):
                name = f"lr{lr:g}_out{c_out:g}_s{seed}"
                loss = 2.0 + 0.05 * (math.log2(lr) + 8) ** 2 + 0.02 * (math.log2(c_out) - 3.3) ** 2
                (tmp_path / "runs" / name).mkdir(parents=True)
                (tmp_path / "runs" / name / "metrics.jsonl").write_text(json.dumps({"step": 600, "val_loss": loss}))
                (tmp_path / "runs" / name / "config.yaml").write_text(dump_config(proxy))
                runs[name] = {"overrides": {"optim.lr": lr, "metap.lr_readout": c_out, "seed": seed}, "status": "done"}
    (tmp_path / "sweep.json").write_text(json.dumps({"swept": ["optim.lr", "metap.lr_readout", "seed"], "runs": runs}))
    result = transfer(tmp_path)
    assert math.log2(result.fits["optim.lr"].optimum) == pytest.approx(-8.0, abs=1e-6)
    # The grid's best c_out is 8 (log2 3 against the true 3.3); the parabola through 4, 8, 16 is exact.
    assert math.log2(result.fits["metap.lr_readout"].optimum) == pytest.approx(3.3, abs=1e-6)
    config = result.config()
    assert config["optim.lr"] == pytest.approx(2.0 ** -8, rel=1e-5)
    assert config["metap.lr_readout"] == pytest.approx(2.0 ** 3.3, rel=1e-5)
    assert not result.warnings
