"""Logit parity with the Hugging Face reference implementation, import and export, and importer errors.

Tiny random HF Llama 4 models exercise every feature (docs/architecture.md): chunking, NoPE layers, temperature
tuning, QK norm, both RoPE bands, top-1 and top-2 MoE, interleaved dense layers.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxllama.checkpoint.model_dir import load_model_dir  # noqa: E402
from maxllama.interop import InteropError  # noqa: E402
from maxllama.interop.convert import hf_export, hf_import  # noqa: E402
from maxllama.interop.safetensors_io import SafetensorsReader, write_file, write_sharded  # noqa: E402
from maxllama.model.build import bind  # noqa: E402
from tests.conftest import kl_divergence  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
               "high_freq_factor": 1.0, "original_max_position_embeddings": 8}
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, attention_chunk_size=8,
            attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1)
CONFIGS = {
    # A tiny config with every feature at once.
    "spec": dict(num_experts_per_tok=2, interleave_moe_layer_step=2, no_rope_layer_interval=2, use_qk_norm=True,
                 rope_parameters=LLAMA3_ROPE),
    # Scout-like: every layer MoE, QK norm, llama3 scaling, top-1.
    "scout": dict(num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=4, use_qk_norm=True,
                  rope_parameters=LLAMA3_ROPE),
    # Maverick-like: dense and MoE layers interleaved, no QK norm, no RoPE scaling, top-1.
    "maverick": dict(num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4, use_qk_norm=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 21))
# fp32 against fp32: the largest |logit difference| measured on the three configs is 3.0e-7 (maverick; spec
# 2.4e-7, scout 2.7e-7, unscanned imports the same), float rounding in another order of operations. A real
# mismatch is far larger: changing a temperature-tuning constant moves the logits by 6e-5 to 8e-5 (attn_scale
# 0.1 -> 0.11), 1.1e-4 to 2.7e-4 (floor(pos / floor_scale) without the + 1), 2.7e-4 to 3.9e-4 (floor_scale x 2).
LOGIT_TOLERANCE = 1e-6


def make_hf_model(name, directory, max_shard_size="200KB"):
    config = transformers.Llama4TextConfig(**BASE, **CONFIGS[name], attn_implementation="eager")
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = transformers.Llama4ForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def maxllama_logits(model_dir, overrides=(), tokens=TOKENS):
    loaded = load_model_dir(model_dir, list(overrides))
    return np.asarray(bind(loaded.model, loaded.params)(jnp.asarray(tokens)).logits)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(request.param, root / "hf")
    hf_import(root / "hf", root / "maxllama", log=lambda *_: None)
    return request.param, root, model, hf_logits(model)


def test_import_matches_hf_logits(converted):
    name, root, _, reference = converted
    diff = np.abs(maxllama_logits(root / "maxllama") - reference).max()
    print(f"\n{name}: import max |logit diff| = {diff:.2e}")
    assert diff <= LOGIT_TOLERANCE


def test_export_round_trip_gives_identical_logits(converted):
    name, root, _, reference = converted
    hf_export(root / "maxllama", root / "exported", max_shard_bytes=100_000, log=lambda *_: None)
    assert (root / "exported" / "model.safetensors.index.json").exists()  # sharded on the way out too
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(root / "exported", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(reloaded), reference)


def test_bf16_compute_against_fp32_reference(converted):
    name, root, _, reference = converted
    logits = maxllama_logits(root / "maxllama", ["model.compute_dtype=bfloat16"])
    kl = kl_divergence(reference, logits)
    print(f"\n{name}: bf16 compute KL(fp32 reference || bf16) = {kl:.2e} nats/token")
    # Measured 6.2e-7 (maverick) to 8.3e-7 (scout): the ceiling is ~10x that. The floor catches an ignored
    # compute_dtype: the fp32 import against the same reference gives 1.1e-15 to 1.4e-15.
    assert 1e-8 < kl < 1e-5


def test_scanned_and_unscanned_imports_agree(converted):
    _, root, _, reference = converted
    unscanned = root / "unscanned"
    if not unscanned.exists():
        hf_import(root / "hf", unscanned, ["model.scan_layers=false"], log=lambda *_: None)
    assert np.abs(maxllama_logits(unscanned) - reference).max() <= LOGIT_TOLERANCE


@pytest.fixture(scope="module")
def spec_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    model = make_hf_model("spec", root / "hf", max_shard_size="10GB")
    assert (root / "hf" / "model.safetensors").exists()  # a single file; the fixture above covers shards
    return root, hf_logits(model)


def per_expert_copy(source, target):
    """The same checkpoint with one [out, in] tensor per expert instead of the fused ones."""
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    reader = SafetensorsReader(source)
    tensors = []
    for name in sorted(reader.names()):
        array = np.asarray(reader.read(name))
        base = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=-1)
            for e in range(array.shape[0]):
                tensors += [(f"{base}.{e}.gate_proj.weight", gate[e].T.copy()), (f"{base}.{e}.up_proj.weight", up[e].T.copy())]
        elif name.endswith("experts.down_proj"):
            tensors += [(f"{base}.{e}.down_proj.weight", array[e].T.copy()) for e in range(array.shape[0])]
        else:
            tensors.append((name, array))
    write_sharded(target, iter(tensors), max_shard_bytes=100_000)


def test_per_expert_layout_imports_to_the_same_model(spec_checkpoint):
    root, reference = spec_checkpoint
    per_expert_copy(root / "hf", root / "per_expert")
    assert (root / "per_expert" / "model.safetensors.index.json").exists()
    assert "model.layers.1.feed_forward.experts.3.up_proj.weight" in SafetensorsReader(root / "per_expert").names()
    hf_import(root / "per_expert", root / "from_per_expert", log=lambda *_: None)
    assert np.abs(maxllama_logits(root / "from_per_expert") - reference).max() <= LOGIT_TOLERANCE


def edited_copy(source, target, *, config=None, drop=None, reshape=None):
    shutil.copytree(source, target)
    if config:
        hf = json.loads((target / "config.json").read_text())
        hf.update(config)
        (target / "config.json").write_text(json.dumps(hf))
    if drop or reshape:
        reader = SafetensorsReader(source)
        tensors = [(n, np.asarray(reader.read(n))) for n in sorted(reader.names()) if n != drop]
        tensors = [(n, a.reshape(reshape[1]) if reshape and n == reshape[0] else a) for n, a in tensors]
        write_file(target / "model.safetensors", tensors)


@pytest.mark.parametrize("edit,message", [
    (dict(config={"model_type": "mistral"}), "model_type 'mistral' is not a Llama 4 model"),
    (dict(drop="model.layers.2.self_attn.k_proj.weight"), "tensor 'model.layers.2.self_attn.k_proj.weight' is missing"),
    (dict(reshape=("model.layers.0.feed_forward.up_proj.weight", (64, 96))),
     "tensor 'model.layers.0.feed_forward.up_proj.weight'"),
    (dict(config={"moe_layers": [1, 2]}), "'moe_layers' = [1, 2] is not a regular interleave pattern"),
    (dict(config={"tie_word_embeddings": True}), "tie_word_embeddings"),
])
def test_unmappable_checkpoints_fail_cleanly(spec_checkpoint, edit, message, tmp_path):
    root, _ = spec_checkpoint
    edited_copy(root / "hf", tmp_path / "hf", **edit)
    with pytest.raises(InteropError) as err:
        hf_import(tmp_path / "hf", tmp_path / "out", log=lambda *_: None)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written staging left


def test_import_refuses_to_overwrite(spec_checkpoint, tmp_path):
    root, _ = spec_checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="not empty"):
        hf_import(root / "hf", tmp_path / "out", log=lambda *_: None)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_refuses_forward_multipliers_transformers_has_no_place_for():
    from maxllama.config import load_config
    from maxllama.interop.convert import hf_checkpoint
    wide = ["model.d_model=128", "model.d_ff=512", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff_expert=256"]
    cfg, _ = load_config("experiments/metap/proxy.yaml", wide)  # MetaP at 4x the proxy's width
    with pytest.raises(InteropError, match=r"^metap.parametrization: .*output_multiplier"):
        hf_checkpoint(cfg, {})
