"""The vision encoder, adapter and projector against Hugging Face's `Llama4VisionModel` and
`Llama4MultiModalProjector`, on tiny random configs fed the same fp32 pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxllama.config import ConfigError, load_config
from maxllama.config.schema import VisionConfig
from maxllama.interop.hf_vision import vision_from_hf, vision_to_hf
from maxllama.model.build import one_device_sharding
from maxllama.model.vision import VisionEncoder, pixel_shuffle, unfold_patches

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.llama4 import modeling_llama4 as hf  # noqa: E402
from tests.hf_reference import hf_multimodal_logits  # noqa: E402

TINY = {  # ours, theirs: two tiles' sides, two head widths
    "grid4": VisionConfig(enabled=True, d_model=32, n_layers=2, n_heads=2, d_ff=128, image_size=32, patch_size=8,
                          projector_dim=48),
    "grid6": VisionConfig(enabled=True, d_model=48, n_layers=3, n_heads=4, d_ff=192, image_size=42, patch_size=7,
                          projector_dim=40),
}
TEXT_D_MODEL = 24


def as_overrides(v: VisionConfig) -> list[str]:
    return [f"vision.{key}={'null' if value is None else value}" for key, value in v.model_dump().items()]


def hf_vision_config(v: VisionConfig) -> dict:
    return dict(hidden_size=v.d_model, num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads,
                intermediate_size=v.d_ff, image_size=v.image_size, patch_size=v.patch_size,
                pixel_shuffle_ratio=v.pixel_shuffle_ratio, projector_input_dim=v.projector_dim,
                projector_output_dim=v.projector_dim, vision_output_dim=v.projector_dim,
                rope_parameters={"rope_theta": v.rope_theta, "rope_type": "default"})


def hf_vision(v: VisionConfig):
    config = transformers.Llama4Config(
        vision_config=hf_vision_config(v),
        text_config=dict(hidden_size=TEXT_D_MODEL, num_attention_heads=2, num_key_value_heads=2, head_dim=12,
                         intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=1, vocab_size=64))
    torch.manual_seed(0)
    vision, projector = hf.Llama4VisionModel(config.vision_config).eval(), hf.Llama4MultiModalProjector(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and norm shifts: make every tensor count
        for name, p in [*vision.named_parameters(), *projector.named_parameters()]:
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return vision, projector


def ours(v: VisionConfig, tensors: dict):
    encoder = VisionEncoder(v, TEXT_D_MODEL, param_dtype="float32", compute_dtype="float32",
                            sharding=one_device_sharding(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    params = vision_from_hf(lambda name: tensors[name], v)
    assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(state))
    for (path, ours_leaf), theirs in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)),
                                         jax.tree.leaves(params)):
        assert ours_leaf.shape == theirs.shape, path
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), params


@pytest.mark.parametrize("name", list(TINY))
def test_vision_features_match_hugging_face(name):
    v = TINY[name]
    vision, projector = hf_vision(v)
    tensors = {f"vision_model.{k}": t.detach().numpy() for k, t in vision.state_dict().items()}
    tensors |= {f"multi_modal_projector.{k}": t.detach().numpy() for k, t in projector.state_dict().items()}
    encoder, params = ours(v, tensors)
    pixels = np.random.default_rng(0).normal(size=(3, 3, v.image_size, v.image_size)).astype(np.float32)
    with torch.no_grad():
        theirs = projector(vision(torch.from_numpy(pixels)).last_hidden_state).numpy()
    graphdef, state = nnx.split(encoder)  # merged inside the trace: what the encoder sows stays there
    mine = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, pixels))
    assert mine.shape == theirs.shape == (3, v.tokens_per_tile, TEXT_D_MODEL)
    assert np.abs(mine - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    # The names map both ways: exporting gives back every tensor HF has (the rotary buffer is not a parameter).
    exported = vision_to_hf(params, v)
    assert set(exported) == set(tensors)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_unfold_and_pixel_shuffle_match_torch():
    pixels = np.random.default_rng(1).normal(size=(2, 3, 12, 12)).astype(np.float32)
    theirs = torch.nn.Unfold(kernel_size=4, stride=4)(torch.from_numpy(pixels)).permute(0, 2, 1).numpy()
    np.testing.assert_array_equal(np.asarray(unfold_patches(pixels, 4)), theirs)
    features = np.random.default_rng(2).normal(size=(2, 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(features, 0.5)),
                                  hf.pixel_shuffle(torch.from_numpy(features), 0.5).numpy())


@pytest.mark.parametrize("override, key, reason", [
    ("vision.image_size=30", "vision.image_size", "not a multiple of vision.patch_size"),
    ("vision.image_size=24", "vision.pixel_shuffle_ratio", "whole grid"),
    ("vision.n_heads=16", "vision.n_heads", "multiple of 4"),
    ("vision.d_ff=100", "vision.d_ff", "d_model / pixel_shuffle_ratio^2"),
])
def test_vision_config_checks_name_the_key(override, key, reason):
    base = ["vision.enabled=true", "vision.d_model=32", "vision.n_heads=2", "vision.d_ff=128",
            "vision.image_size=32", "vision.patch_size=8"]
    load_config(None, base)
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override])
    assert str(err.value).removeprefix("override: ").startswith(f"{key}: ") and reason in str(err.value)


# --- the whole multimodal model ---------------------------------------------------------------------------------

PATCH_ID = 100
TEXT = dict(vocab_size=128, hidden_size=TEXT_D_MODEL * 2, intermediate_size=32, intermediate_size_mlp=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4,
            num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layer_interval=2, use_qk_norm=True,
            attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1)


def hf_multimodal(v: VisionConfig, directory):
    config = transformers.Llama4Config(
        vision_config=hf_vision_config(v),
        text_config=TEXT, image_token_index=PATCH_ID, attn_implementation="eager")
    torch.manual_seed(1)
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero biases and norm shifts, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.startswith("vision_model") and p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    model.save_pretrained(directory)
    return model


def image_tokens(v: VisionConfig, tiles_per_row: list[int], length: int) -> np.ndarray:
    """Rows of text tokens, each with its tiles' <|patch|> runs starting at position 3."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, PATCH_ID, (len(tiles_per_row), length))
    for row, tiles in enumerate(tiles_per_row):
        tokens[row, 3:3 + tiles * v.tokens_per_tile] = PATCH_ID
    return tokens


@pytest.mark.parametrize("name", ["grid4", pytest.param("grid6", marks=pytest.mark.slow)])  # grid6: make test-slow
def test_multimodal_logits_match_hugging_face(name, tmp_path):
    from maxllama.checkpoint.model_dir import load_model_dir
    from maxllama.interop.convert import hf_import
    from maxllama.model.build import bind
    from maxllama.model.decoder import Images
    v = TINY[name]
    model = hf_multimodal(v, tmp_path / "hf")
    hf_import(tmp_path / "hf", tmp_path / "maxllama", log=lambda *_: None)
    loaded = load_model_dir(tmp_path / "maxllama")
    assert loaded.cfg.vision == v.model_copy(update={"norm_eps": loaded.cfg.vision.norm_eps})
    tiles = [2, 1]  # several tiles in one row, one in the other (its second tile blank)
    tokens = image_tokens(v, tiles, 3 + 2 * v.tokens_per_tile + 6)
    pixels = np.random.default_rng(4).normal(size=(2, 2, 3, v.image_size, v.image_size)).astype(np.float32)
    pixels[1, 1] = 0.0
    reference = hf_multimodal_logits(model, tokens, pixels[[0, 0, 1], [0, 1, 0]])
    images = Images(jnp.asarray(pixels), jnp.asarray(tokens == PATCH_ID))
    ours = np.asarray(bind(loaded.model, loaded.params)(jnp.asarray(tokens), images=images).logits)
    diff = np.abs(ours - reference).max()
    print(f"\n{name}: max |logit diff| with images = {diff:.2e}")
    assert diff <= 1e-4
    # The images matter: without them the logits at and after the patches are others.
    text_only = np.asarray(bind(loaded.model, loaded.params)(jnp.asarray(tokens)).logits)
    assert np.abs(text_only - reference)[:, 3:].max() > 100 * diff


def analytic_vision_params(v: VisionConfig, text_d_model: int) -> int:
    """Counted by hand from the architecture: patch embedding, class token and positions, two norms, the layers
    (biased q, k, v, o and MLP, two norms each), the adapter and the projector."""
    d, f = v.d_model, v.d_ff
    patch_embed = 3 * v.patch_size ** 2 * d
    class_and_positions = d + ((v.image_size // v.patch_size) ** 2 + 1) * d
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    adapter = int(d / v.pixel_shuffle_ratio ** 2) * v.projector_dim + v.projector_dim ** 2
    return patch_embed + class_and_positions + 2 * 2 * d + v.n_layers * block + adapter + v.projector_dim * text_d_model


@pytest.mark.parametrize("config", ["experiments/llama4_scout.yaml", None])
def test_the_built_vision_tower_has_the_analytic_parameter_count(config):
    from maxllama.model.build import IS_META, define_abstract
    from maxllama.model.param_count import count_params
    from maxllama.base.tree import flat_paths
    overrides = [] if config else as_overrides(TINY["grid6"])
    cfg, _ = load_config(config, overrides)
    model = define_abstract(cfg)
    counts = count_params(cfg, model)
    assert counts.vision_total == analytic_vision_params(cfg.vision, cfg.model.d_model)
    if config:
        assert round(counts.total / 1e8) == 1086 and round(counts.active / 1e8) == 172  # Scout: 108.6B, 17.2B active
    # Every vision parameter has a MetaP role, by the same shape comparison as the decoder's.
    roles = {path: meta["role"] for path, meta in flat_paths(model.metadata, is_leaf=IS_META).items()
             if path.startswith("vision.")}
    assert roles["vision.patch_embedding"] == roles["vision.positional_embedding"] == "embedding"
    assert roles["vision.layers.q"] == roles["vision.adapter_fc1"] == roles["vision.projector"] == "hidden"
    assert roles["vision.layers.q_bias"] == roles["vision.layernorm_pre.weight"] == "vector"


def test_the_vision_tower_has_its_own_width_ratio_against_the_proxys():
    from maxllama.base.tree import flat_paths
    from maxllama.metap import ParamRule
    from maxllama.model.build import define_abstract
    vision = as_overrides(TINY["grid4"].model_copy(update={"d_model": 64, "d_ff": 256}))
    proxy = ["metap.parametrization=metap", "metap.base.vision_d_model=32", "metap.base.vision_d_ff=128",
             "metap.base.vision_n_heads=1", "metap.base.vision_projector_dim=24"]
    cfg, _ = load_config(None, [*vision, *proxy])
    rules = flat_paths(define_abstract(cfg).rules, is_leaf=lambda x: isinstance(x, ParamRule))
    assert rules["vision.layers.q"].ratio == rules["vision.adapter_fc1"].ratio == 2.0  # 64 / 32 and 256 / 128
    assert rules["vision.projector"].ratio == 2.0  # 48 / 24
    assert rules["groups.blocks.0.attention.q"].ratio == 1.0  # the text widths are the proxy's
    assert rules["vision.layers.q"].lr_multiplier == pytest.approx(rules["groups.blocks.0.attention.q"].lr_multiplier / 2)


def test_vision_flops_by_hand_and_against_xla_cost_analysis():
    from maxllama.train.flops import vision_forward_flops_per_tile
    v = TINY["grid4"]  # d 32, 2 layers, d_ff 128, 4 x 4 patches of 8 x 8, adapter 48, projector to 24
    n = 17
    by_hand = (2 * 16 * 192 * 32 + 2 * (n * (8 * 32 * 32 + 4 * 32 * 128) + 4 * n * n * 32)
               + 4 * (2 * 128 * 48 + 2 * 48 * 48) + 4 * 2 * 48 * TEXT_D_MODEL)
    assert vision_forward_flops_per_tile(v, TEXT_D_MODEL) == by_hand
    # Against XLA: wide enough that matmuls dominate, one layer (XLA counts a scanned body once, not per layer).
    wide = VisionConfig(enabled=True, d_model=256, n_layers=1, n_heads=4, d_ff=1024, image_size=32, patch_size=8,
                        projector_dim=256)
    encoder = VisionEncoder(wide, 64, param_dtype="float32", compute_dtype="float32",
                            sharding=one_device_sharding(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    pixels = jax.ShapeDtypeStruct((6, 3, 32, 32), jnp.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, pixels).compile()
    analysed = compiled.cost_analysis()
    analysed = analysed[0] if isinstance(analysed, list) else analysed
    # XLA also counts the element-wise work (norms, GELU, softmax, RoPE): measured 5.5% more here.
    assert 1.0 <= analysed["flops"] / (6 * vision_forward_flops_per_tile(wide, 64)) <= 1.08
