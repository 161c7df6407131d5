"""Images as the decoder reads them: decoded safely, cut into tiles the way Llama 4's processor cuts them, and
laid out as tokens.

An image is resized without distortion onto the best canvas of at most `max_tiles` tiles (the smallest
upscale that fits, else the least downscale; among equals the smallest area), padded, and split into tiles of
`image_size`; with more than one tile a downscaled global view follows. Its tokens: `<|image_start|>`, per
tile row the tiles' `<|patch|>` runs separated by `<|tile_x_separator|>` and ended by `<|tile_y_separator|>`
(only with several tiles), then `<|image|>` and the last tile's run, then `<|image_end|>`. The special tokens
are inserted as ids: text that spells `<|patch|>` stays text.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import NamedTuple

import numpy as np

MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs), not decoded
IMAGE_TOKENS = ("image_start", "image_end", "tile_x_separator", "tile_y_separator", "image", "patch")
# Why an image is skipped: BadImage's reasons, and a file that is missing or cannot be read.
IMAGE_SKIP_REASONS = ("corrupt_image", "empty_image", "too_large_image", "missing_image", "unreadable_image")


class BadImage(ValueError):
    """An image that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB from encoded bytes. Grayscale, palette, CMYK and 16-bit images are converted;
    transparency is composited onto white. Raises BadImage(empty | too_large | corrupt_image)."""
    from PIL import Image
    if not data:
        raise BadImage("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImage("too_large_image", f"{image.width}x{image.height} pixels")
                image.load()
                return _to_rgb(image)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large_image", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable, truncated or unknown data
        raise BadImage("corrupt_image", str(e)[:100]) from None


def _to_rgb(image) -> np.ndarray:
    from PIL import Image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16- or 32-bit gray: scale to 8 bits
        array = np.asarray(image, np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in image.info or "A" in image.mode):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), np.uint8)


@functools.lru_cache(maxsize=16)
def canvases(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, columns) of at most max_tiles tiles, grouped by aspect ratio in the order Llama 4's processor
    lists them (which decides between canvases of equal scale and area)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(r for r in range(1, n + 1) if n % r == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return tuple(canvas for group in by_ratio.values() for canvas in group)


def best_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(rows, columns) of tiles for an image of this size (see the module's docstring)."""
    options = np.asarray(canvases(max_tiles))
    scales = np.minimum(options[:, 0] * tile / height, options[:, 1] * tile / width)
    upscaling = scales[scales >= 1]
    chosen = upscaling.min() if len(upscaling) else scales[scales < 1].max()
    candidates = options[scales == chosen]
    rows, columns = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(rows), int(columns)


def _fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return max(min(int(height * scale_w), target_h), 1), target_w
    return target_h, max(min(int(width * scale_h), target_w), 1)


class Tiles(NamedTuple):
    pixels: np.ndarray  # [n, 3, tile, tile] uint8: the canvas's tiles row-major, then the global view if n > 1
    canvas: tuple[int, int]  # (rows, columns)


def tile_image(rgb: np.ndarray, tile: int, max_tiles: int) -> Tiles:
    """Resize onto the best canvas (never upscaling past one tile's side), pad right and bottom, split."""
    from PIL import Image
    height, width = rgb.shape[:2]
    rows, columns = best_canvas(height, width, tile, max_tiles)
    target_h = min(max(height, tile), rows * tile)
    target_w = min(max(width, tile), columns * tile)
    new_h, new_w = _fit_without_distortion(height, width, target_h, target_w)
    image = Image.fromarray(rgb)
    canvas = np.zeros((rows * tile, columns * tile, 3), np.uint8)
    canvas[:new_h, :new_w] = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    tiles = canvas.reshape(rows, tile, columns, tile, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, tile, tile)
    if rows * columns > 1:
        global_view = np.asarray(image.resize((tile, tile), Image.BILINEAR)).transpose(2, 0, 1)[None]
        tiles = np.concatenate([tiles, global_view])
    return Tiles(tiles, (rows, columns))


def image_tokens(canvas: tuple[int, int], tokens_per_tile: int, ids: dict[str, int]) -> list[int]:
    """The token layout of one image (ids: the tokenizer's ids of IMAGE_TOKENS)."""
    rows, columns = canvas
    run = [ids["patch"]] * tokens_per_tile
    out = [ids["image_start"]]
    if rows * columns > 1:
        for _ in range(rows):
            for x in range(columns):
                out += run + ([ids["tile_x_separator"]] if x < columns - 1 else [])
            out.append(ids["tile_y_separator"])
    return out + [ids["image"]] + run + [ids["image_end"]]

