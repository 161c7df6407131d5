"""Images: canvases and token layout as Llama 4's processor decides them, safe decoding, every mode converted."""

import ast
import collections
import io
import math
import pathlib
import types

import numpy as np
import pytest
from PIL import Image

from maxllama.data.images import (IMAGE_TOKENS, BadImage, best_canvas, canvases, decode_image, image_tokens,
                                  tile_image)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_image_functions(*names):
    """Pure functions of transformers' Llama 4 image processor, read from its source: the module itself needs
    torchvision, which the parity extra does not install."""
    path = pathlib.Path(transformers.__file__).parent / "models/llama4/image_processing_llama4.py"
    nodes = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name in names]
    for node in nodes:
        node.decorator_list = []  # lru_cache would need a hashable SizeDict
    namespace = {"math": math, "torch": torch, "defaultdict": collections.defaultdict, "SizeDict": object}
    exec(compile(ast.Module(nodes, []), str(path), "exec"), namespace)
    return [namespace[n] for n in names]


@pytest.mark.parametrize("max_tiles", [1, 4, 16])
def test_the_canvas_is_the_one_the_hf_processor_picks(max_tiles):
    find, best, _ = hf_image_functions("find_supported_resolutions", "get_best_fit", "get_factors")
    tile = 28
    resolutions = torch.tensor(find(max_tiles, types.SimpleNamespace(height=tile, width=tile)))
    assert [tuple(r) for r in (resolutions // tile).tolist()] == list(canvases(max_tiles))
    for height, width in np.random.default_rng(max_tiles).integers(1, 12 * tile, (1500, 2)):
        chosen = best((int(height), int(width)), resolutions).tolist()
        assert best_canvas(int(height), int(width), tile, max_tiles) == (chosen[0] // tile, chosen[1] // tile)


@pytest.mark.parametrize("canvas", [(1, 1), (1, 2), (2, 3), (4, 1)])
def test_the_token_layout_is_the_hf_processors(canvas):
    from transformers.models.llama4.processing_llama4 import Llama4Processor
    ids = {name: 1000 + i for i, name in enumerate(IMAGE_TOKENS)}
    names = {v: f"<|{k}|>" for k, v in ids.items()}
    ours = "".join(names[t] for t in image_tokens(canvas, 4, ids))
    assert ours == Llama4Processor._prompt_split_image(None, canvas, 4)


def test_tiles_cover_the_canvas_and_add_a_global_view():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    tiles = tile_image(rgb, 32, 2)
    assert tiles.canvas == (1, 2) and tiles.pixels.shape == (3, 3, 32, 32) and tiles.pixels.dtype == np.uint8
    # Downscaled without distortion to the canvas's height: 90 x 50 -> 57 x 32; the rest is padding (zeros).
    canvas = np.concatenate([tiles.pixels[0], tiles.pixels[1]], axis=2)
    assert canvas[:, :, 57:].max() == 0 and canvas[:, :, :57].min(axis=(0, 1)).max() >= 0 and canvas[:, :, 56].max() > 0
    assert tile_image(rgb, 32, 4).canvas == (2, 2)  # more tiles allowed: less downscaling
    single = tile_image(rgb[:20, :20], 32, 4)
    assert single.canvas == (1, 1) and single.pixels.shape == (1, 3, 32, 32)  # one tile: no global view


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "RGB"])
def test_every_image_mode_becomes_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((9, 7), 40000, np.uint16))
    out = decode_image(encoded(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.min() == out.max() == round(40000 / 65535 * 255)  # 16 bits scaled, not clipped
    if mode == "RGBA":
        transparent = rgb.convert("RGBA")
        transparent.putalpha(0)
        assert decode_image(encoded(transparent)).min() == 255  # onto white


def test_bad_images_are_refused_by_reason(monkeypatch):
    good = encoded(Image.new("RGB", (16, 16), (10, 20, 30)))
    cases = {"empty_image": b"", "corrupt_image": b"not an image at all", "corrupt_image ": good[: len(good) // 2]}
    for reason, data in cases.items():
        with pytest.raises(BadImage) as err:
            decode_image(data)
        assert err.value.reason == reason.strip()
    monkeypatch.setattr("maxllama.data.images.MAX_PIXELS", 100)
    with pytest.raises(BadImage) as err:
        decode_image(good)
    assert err.value.reason == "too_large_image"
