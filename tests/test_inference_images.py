"""Inference with images: prompts laid out as training documents, cached generation equal to recomputation with
the image, the image reaching the prefill, and `sample`/`score` taking images on the command line."""

import io
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from maxllama.checkpoint.manager import Checkpointer
from maxllama.cli import main
from maxllama.config import dump_config
from maxllama.config.schema import SourceConfig, VisionConfig
from maxllama.data.image_captions import load_image_source
from maxllama.data.tokenizer import make_tokenizer
from maxllama.inference.prompts import encode_prompt, stack_prompts
from maxllama.inference.sampling import generate_by_recomputation, make_generate
from maxllama.model.build import bind
from tests.test_model import make

# 16-pixel tiles of 4 x 4 patches: 4 <|patch|> tokens a tile; a 16 x 32 image is two tiles and a global view.
VISION = ["vision.enabled=true", "vision.d_model=16", "vision.n_heads=2", "vision.d_ff=64", "vision.image_size=16",
          "vision.patch_size=4", "vision.projector_dim=16", "vision.n_layers=1", "vision.max_tiles=2"]


def save_model_dir(directory, cfg, params):
    directory.mkdir(exist_ok=True)
    (directory / "config.yaml").write_text(dump_config(cfg))
    checkpointer = Checkpointer(directory / "checkpoints")
    checkpointer.save_params(3, params)
    checkpointer.close()
    return directory


def write_png(path, array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    """One tiny model with a vision tower, its model directory, and a few images on disk."""
    cfg, model, params = make(*VISION)
    root = tmp_path_factory.mktemp("vision_inference")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    images = {name: write_png(root / "img" / f"{name}.png", rng.integers(0, 256, shape, dtype=np.uint8))
              for name, shape in (("wide", (16, 32, 3)), ("wide2", (16, 32, 3)))}
    return SimpleNamespace(cfg=cfg, model=model, params=params, root=root, images=images,
                           tokenizer=make_tokenizer(cfg.data.tokenizer),
                           model_dir=save_model_dir(root / "model", cfg, params))


def prompt_of(vm, text, image):
    return encode_prompt(vm.tokenizer, text, vm.cfg.model.vocab_size, image=image, vision=vm.cfg.vision)


def test_a_prompt_is_a_training_document_before_its_eos(vm):
    (vm.root / "pairs.jsonl").write_text(json.dumps({"image": "img/wide.png", "text": "a cat"}) + "\n")
    source = SourceConfig(path=str(vm.root / "pairs.jsonl"), format="image_caption")
    tokens, tiles = load_image_source(0, source, vm.tokenizer, vm.cfg.vision, 0.0)[0]["train"].document(0)
    prompt = prompt_of(vm, "a cat", vm.images["wide"])
    np.testing.assert_array_equal(prompt.tokens[0], tokens[:-1])
    np.testing.assert_array_equal(prompt.pixels[0], tiles)
    assert prompt.patch_mask.sum() == 3 * vm.cfg.vision.tokens_per_tile  # two tiles and the global view
    np.testing.assert_array_equal(prompt.patch_mask, prompt.tokens == vm.tokenizer.special["<|patch|>"])


def test_cached_greedy_generation_with_images_equals_recomputation(vm):
    prompt = stack_prompts([prompt_of(vm, "a cat", vm.images["wide"]), prompt_of(vm, "a dog", vm.images["wide2"])])
    assert prompt.pixels.shape == (2, 3, 3, 16, 16)
    cached = make_generate(vm.model)(vm.params, prompt.tokens, 16, images=prompt.images())  # 39 tokens, 5 chunks
    reference = generate_by_recomputation(vm.model, vm.params, prompt.tokens, 16, images=prompt.images())
    np.testing.assert_array_equal(cached, reference)


def test_the_pixels_reach_the_prefill(vm):
    real = [prompt_of(vm, "a cat", vm.images[name]) for name in ("wide", "wide2")]
    blank = prompt_of(vm, "a cat", np.zeros((16, 32, 3), np.uint8))
    prompt = stack_prompts([*real, blank])
    cache = bind(vm.model, vm.params).init_cache(3, prompt.tokens.shape[1], np.dtype(vm.cfg.model.compute_dtype))
    prefill = jax.jit(lambda p, t, c, i: bind(vm.model, p)(t, cache=c, images=i).logits[:, -1])  # as make_generate's
    last = np.asarray(prefill(vm.params, prompt.tokens, cache, prompt.images()))
    assert np.abs(last[0] - last[1]).max() > 1e-3  # two images
    assert np.abs(last[0] - last[2]).max() > 1e-3  # a real image and a blank one


def sampled_text(stdout: str) -> str:
    lines = stdout.splitlines()
    return "\n".join(lines[[i for i, line in enumerate(lines) if line.startswith("--- sample 1")][0] + 1:])


def test_sample_and_score_commands_take_images(vm, tmp_path, capsys):
    greedy = ["--temperature", "0", "--max-new-tokens", "6"]
    assert main(["sample", str(vm.model_dir), "--image", str(vm.images["wide"]), "--prompt", "a ", *greedy]) == 0
    single = sampled_text(capsys.readouterr().out)
    assert single.startswith("a ")

    requests = [{"prompt": "a ", "image": "img/wide.png", "id": 7}, {"prompt": "hello"},  # a relative path
                {"prompt": "b ", "image": str(vm.images["wide2"])}]  # an absolute one
    (vm.root / "requests.jsonl").write_text("\n".join(map(json.dumps, requests)) + "\n\n")
    out = tmp_path / "results.jsonl"
    assert main(["sample", str(vm.model_dir), "--input", str(vm.root / "requests.jsonl"), "--output", str(out),
                 *greedy]) == 0
    assert "3 results" in capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "text"} for r in results] == requests  # in order, fields kept
    assert all(isinstance(r["text"], str) for r in results)
    assert "a " + results[0]["text"] == single  # the same greedy decoding as --image

    scored = [{"text": "a cat", "image": "img/wide.png"}, {"text": "a cat"}]
    (vm.root / "score.jsonl").write_text("\n".join(map(json.dumps, scored)) + "\n")
    assert main(["score", str(vm.model_dir), "--input", str(vm.root / "score.jsonl")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[0].isdigit()]
    expected = []
    forward = jax.jit(lambda p, t, i: bind(vm.model, p)(t, images=i).logits)
    for request in scored:  # the reference: the full forward, the text's positions counted by hand
        prompt = prompt_of(vm, request["text"], vm.root / request["image"] if "image" in request else None)
        log_probs = np.asarray(jax.nn.log_softmax(forward(vm.params, prompt.tokens, prompt.images())[0, :-1]))
        targets = np.arange(prompt.tokens.shape[1] - len(request["text"]), prompt.tokens.shape[1])  # one byte a token
        expected.append(log_probs[targets - 1, prompt.tokens[0, targets]].mean())
    np.testing.assert_allclose([float(r[1]) for r in rows], expected, atol=1e-4)
    np.testing.assert_allclose([float(r[2]) for r in rows], np.exp(-np.asarray(expected)), rtol=1e-3)
    assert expected[0] != pytest.approx(expected[1], abs=1e-4)  # the image changes the text's likelihood


def test_image_errors_exit_2_naming_what_to_fix(vm, tmp_path, capsys):
    # The same model without its vision tower: a text-only model directory.
    text_cfg = vm.cfg.model_copy(update={"vision": VisionConfig()})
    text_only = save_model_dir(tmp_path / "text", text_cfg, {k: v for k, v in vm.params.items() if k != "vision"})
    assert main(["sample", str(text_only), "--image", str(vm.images["wide"]), "--max-new-tokens", "2"]) == 2
    assert "no vision tower" in capsys.readouterr().err

    lines = {"missing.jsonl": [{"prompt": "a", "image": "img/wide.png"}, {"prompt": "a", "image": "img/gone.png"}],
             "no_prompt.jsonl": [{"image": "img/wide.png"}], "not_json.jsonl": ["{oops"]}
    for name, records in lines.items():
        (vm.root / name).write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
        code = main(["sample", str(vm.model_dir), "--input", str(vm.root / name), "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert f"{vm.root / name}:{len(records)}:" in err, err
    assert not (tmp_path / "o").exists()  # nothing decoded, nothing written
    (vm.root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (vm.root / "bad.jsonl").write_text(json.dumps({"text": "a", "image": "corrupt.png"}) + "\n")
    assert main(["score", str(vm.model_dir), "--input", str(vm.root / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{vm.root / 'bad.jsonl'}:1: unusable image" in err and "corrupt_image" in err
