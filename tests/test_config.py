import textwrap

import pytest

from maxllama.config import ConfigError, dump_config, load_config, resolved_origins
from maxllama.config.loader import parse_scalar


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_base_inheritance_deep_merges_and_records_origins(tmp_path):
    write(tmp_path, "base.yaml", """\
        model:
          d_model: 64
          n_layers: 2
        optim:
          lr: 1.0e-3
        """)
    child = write(tmp_path, "child.yaml", """\
        base: base.yaml
        model:
          n_layers: 6
        """)
    cfg, origins = load_config(child, ["optim.lr=2e-3"])
    assert cfg.model.d_model == 64  # inherited
    assert cfg.model.n_layers == 6  # overridden by the child
    assert cfg.optim.lr == 2e-3  # command line wins, and `2e-3` is a float
    where = resolved_origins(cfg, origins)
    assert where["model.d_model"].endswith("base.yaml:2")
    assert where["model.n_layers"].endswith("child.yaml:3")
    assert where["optim.lr"] == "override"
    assert where["train.steps"] == "default"


def test_base_chain_loop_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_dump_round_trips(tmp_path):
    cfg, _ = load_config(None, ["model.rope_scaling={factor: 8.0}", "model.head_dim=64"])
    again, _ = load_config(write(tmp_path, "dump.yaml", dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text,value", [("3", 3), ("1e-3", 1e-3), ("null", None), ("[1, 2]", [1, 2]),
                                        ("true", True), ("wsd", "wsd")])
def test_override_values_parse_as_yaml(text, value):
    assert parse_scalar(text) == value


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_head'; did you mean model.n_heads"):
        load_config(None, ["model.n_head=8"])
    path = write(tmp_path, "bad.yaml", "train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: unknown key 'train.stepz'; did you mean train.steps"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("model.d_model=abc", "model.d_model: must be a valid integer, got 'abc'"),
    ("model.d_model=1.5", "model.d_model: must be a valid integer"),
    ("optim.schedule=linear", "optim.schedule: must be one of 'cosine', 'wsd' or 'constant'"),
    ("model.compute_dtype=float16", "model.compute_dtype: must be one of 'float32' or 'bfloat16'"),
    ("resume=maybe", "resume: must be one of"),
    ("model.rope_scaling.factor=big", "model.rope_scaling.factor: must be a valid number"),
])
def test_wrong_types_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides,key,reason", [
    (["model.n_heads=6", "model.n_kv_heads=4"], "model.n_kv_heads", "multiple of n_kv_heads"),
    (["model.d_model=100", "model.n_heads=8"], "model.head_dim", "divisible by n_heads"),
    (["model.head_dim=33"], "model.head_dim", "must be even"),
    (["model.top_k=5"], "model.top_k", "between 1 and n_experts"),
    (["model.n_experts=0"], "model.n_experts", "at least one expert"),
    (["model.moe_every=8"], "model.moe_every", "exceeds n_layers"),
    (["model.attn_chunk=48"], "model.attn_chunk", "must divide train.seq_len"),
    (["model.attn_chunk=0"], "model.attn_chunk", "must be positive"),
    (["model.n_layers=0"], "model.n_layers", "must be positive"),
    (["model.nope_every=-1"], "model.nope_every", ">= 0"),
    (["model.rope_scaling={low_freq_factor: 4.0, high_freq_factor: 1.0}"], "model.rope_scaling.low_freq_factor",
     "low_freq_factor <= high_freq_factor"),
    (["optim.warmup_steps=2000"], "optim.warmup_steps", "longer than the run"),
    (["optim.schedule=wsd", "optim.decay_fraction=0.95", "optim.warmup_steps=100"], "optim.decay_fraction",
     "exceed train.steps"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio", "in [0, 1]"),
    (["optim.b1=-0.1"], "optim.b1", "betas must be in [0, 1), got -0.1"),
    (["optim.b2=2"], "optim.b2", "betas must be in [0, 1), got 2"),
    (["train.grad_clip=0"], "train.grad_clip", "positive or null"),
    (["data.val_fraction=1.5"], "data.val_fraction", "(0, 1)"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh", "at most one mesh axis"),
    (["mesh.tensor=0"], "mesh.tensor", "positive size or -1"),
])
def test_consistency_rules(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).removeprefix("override: ").startswith(f"{key}: ")
    assert reason in str(err.value)


def test_shipped_experiments_are_valid():
    for name in ["tiny", "llama4_scout", "llama4_maverick", "bench/tiny"]:
        load_config(f"experiments/{name}.yaml")


def test_maverick_inherits_scout_and_overrides():
    cfg, origins = load_config("experiments/llama4_maverick.yaml")
    assert cfg.model.d_model == 5120 and cfg.model.n_experts == 128 and cfg.model.rope_scaling is None
    assert resolved_origins(cfg, origins)["model.d_model"].startswith("experiments/llama4_scout.yaml:")
