"""Export of a multimodal model as `transformers.Llama4ForConditionalGeneration`: every tensor where HF looks for
it, the same logits with the same images, and export -> import giving back the model that was exported."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxllama.base.errors import UserError  # noqa: E402
from maxllama.base.tree import flat_paths  # noqa: E402
from maxllama.checkpoint.model_dir import load_model_dir  # noqa: E402
from maxllama.config import dump_config  # noqa: E402
from maxllama.data.tokenizer import make_tokenizer  # noqa: E402
from maxllama.interop import InteropError  # noqa: E402
from maxllama.interop.convert import hf_export, hf_import  # noqa: E402
from maxllama.interop.hf_config import hf_multimodal_config_from_model  # noqa: E402
from maxllama.model.build import bind, define_model  # noqa: E402
from maxllama.model.decoder import Images  # noqa: E402
from tests.hf_reference import hf_multimodal_logits  # noqa: E402
from tests.test_inference_images import save_model_dir  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.test_model import SHARDING  # noqa: E402
from tests.test_vision import TINY, as_overrides  # noqa: E402

QUIET = dict(log=lambda *_: None)
# Import writes HF's head_dim explicitly: set it here too, so that the round trip compares whole sections.
MODEL = ["model.head_dim=8", *as_overrides(TINY["grid4"])]


def random_params(model):
    """Random parameters of the model's shapes, drawn here rather than by the initializer, whose compile would
    take most of this file's time: matrices at HF's init scale, and norms and biases off their 1 and 0 as well,
    so that a misplaced one shows."""
    rng = np.random.default_rng(0)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        centre = 1.0 if "norm" in name and "weight" in name else 0.0
        scale = 0.1 if "norm" in name or "bias" in name else 0.02
        return (centre + scale * rng.normal(size=shape.shape)).astype(shape.dtype)
    return jax.tree_util.tree_map_with_path(draw, model.abstract_params)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_export")
    cfg = small_config(*MODEL)
    model = define_model(cfg, SHARDING)
    params = random_params(model)
    save_model_dir(root / "model", cfg, params)
    hf_export(root / "model", root / "hf", max_shard_bytes=100_000, **QUIET)
    return root, cfg, model, params


def rows_with_images(cfg, patch_id):
    """Two rows: two tiles' <|patch|> runs in the first, one tile in the second (its second tile blank)."""
    per_tile = cfg.vision.tokens_per_tile
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (2, 3 + 2 * per_tile + 6))
    for row, tiles in enumerate([2, 1]):
        tokens[row, 3:3 + tiles * per_tile] = patch_id
    pixels = rng.normal(size=(2, 2, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    pixels[1, 1] = 0.0
    return tokens, pixels


def test_export_loads_as_conditional_generation_with_the_same_logits(exported):
    root, cfg, model, params = exported
    hf_cfg = json.loads((root / "hf" / "config.json").read_text())
    patch_id = make_tokenizer(cfg.data.tokenizer).special["<|patch|>"]
    assert hf_cfg["architectures"] == ["Llama4ForConditionalGeneration"] and hf_cfg["model_type"] == "llama4"
    assert hf_cfg["image_token_index"] == patch_id
    assert (root / "hf" / "model.safetensors.index.json").exists()  # sharded like the text export
    hf_model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(
        root / "hf", attn_implementation="eager", output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"} and not any(info.values()), info
    tokens, pixels = rows_with_images(cfg, patch_id)
    reference = hf_multimodal_logits(hf_model.eval(), tokens, pixels[[0, 0, 1], [0, 1, 0]])
    forward = bind(model, params)
    ours = np.asarray(forward(jnp.asarray(tokens), images=Images(jnp.asarray(pixels), jnp.asarray(tokens == patch_id))).logits)
    diff = np.abs(ours - reference).max()
    print(f"\nexport: max |logit diff| with images = {diff:.2e}")
    assert diff <= 1e-4
    # The images matter: without them the logits at and after the patches are others.
    assert np.abs(np.asarray(forward(jnp.asarray(tokens)).logits) - reference)[:, 3:].max() > 100 * diff


def test_export_then_import_gives_back_the_exported_model(exported):
    root, cfg, _, params = exported
    messages = []
    hf_import(root / "hf", root / "reimported", log=messages.append)
    assert not [m for m in messages if m.startswith("note:")]  # the image token ids are the tokenizer's
    loaded = load_model_dir(root / "reimported")
    assert loaded.cfg.model == cfg.model and loaded.cfg.vision == cfg.vision
    ours, theirs = flat_paths(params), flat_paths(loaded.params)
    assert ours.keys() == theirs.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(value), err_msg=path)


def test_the_command_names_the_class_that_loads_it(exported, tmp_path):
    root, *_ = exported
    result = subprocess.run([sys.executable, "-m", "maxllama", "convert", "hf-export", str(root / "model"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"next: transformers.Llama4ForConditionalGeneration.from_pretrained('{tmp_path / 'out'}')" in result.stdout


@pytest.mark.parametrize("section, update, key", [
    ("vision", {"norm_eps": 1e-6}, "vision.norm_eps"),  # HF's vision LayerNorms ignore norm_eps
    ("model", {"vocab_size": 200}, "model.vocab_size"),  # the byte tokenizer's <|patch|> is 264: no embedding
    ("model", {"shared_expert": False}, "model.shared_expert"),  # the text export's own refusal still holds
])
def test_what_hugging_face_cannot_represent_is_refused_by_key(exported, section, update, key):
    _, cfg, *_ = exported
    sections = {"model": cfg.model, "vision": cfg.vision}
    sections[section] = sections[section].model_copy(update=update)
    with pytest.raises(InteropError, match=key.replace(".", r"\.")) as err:
        hf_multimodal_config_from_model(sections["model"], sections["vision"],
                                        make_tokenizer(cfg.data.tokenizer).special)
    assert isinstance(err.value, UserError)  # the command line's exit 2


def test_a_refused_export_writes_nothing(exported, tmp_path):
    root, cfg, *_ = exported
    shutil.copytree(root / "model", tmp_path / "model")
    refused = cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"norm_eps": 1e-6})})
    (tmp_path / "model" / "config.yaml").write_text(dump_config(refused))  # the same shapes: the checkpoint loads
    with pytest.raises(InteropError, match=r"vision\.norm_eps"):
        hf_export(tmp_path / "model", tmp_path / "out", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no staging folder


def exported_copy(exported, target, edit):
    """A copy of the exported checkpoint with `edit` applied to its config.json."""
    root, *_ = exported
    shutil.copytree(root / "hf", target)
    hf = json.loads((target / "config.json").read_text())
    edit(hf)
    (target / "config.json").write_text(json.dumps(hf))
    return target


def test_import_refuses_a_vision_norm_eps_transformers_ignores(exported, tmp_path):
    hf_dir = exported_copy(exported, tmp_path / "hf", lambda hf: hf["vision_config"].update(norm_eps=1e-6))
    with pytest.raises(InteropError, match=r"vision_config\.norm_eps is 1e-06"):
        hf_import(hf_dir, tmp_path / "out", **QUIET)


def test_import_notes_image_token_ids_the_tokenizer_gives_other_tokens(exported, tmp_path):
    hf_dir = exported_copy(exported, tmp_path / "hf", lambda hf: hf.update(image_token_index=7))
    messages = []
    hf_import(hf_dir, tmp_path / "out", log=messages.append)
    assert [m for m in messages if m.startswith("note:")] == [
        "note: config.json's image_token_index 7 is not <|patch|> (264) in data.tokenizer=byte; import with the "
        "checkpoint's tokenizer (data.tokenizer=PATH) to keep its ids"]
