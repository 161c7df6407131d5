"""Prompts as the decoder reads them: `BOS <image block> text`, the layout of a training document before its EOS,
with the image decoded, tiled and laid out as tokens exactly as the data pipeline does it.

One prompt is a batch of one; `stack_prompts` joins prompts of one length (the images of one canvas, say) into
one batch, and `batches` groups any prompts into such batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from maxllama.base.errors import UserError
from maxllama.config.schema import VisionConfig
from maxllama.data.image_captions import image_token_ids
from maxllama.data.images import BadImage, decode_image, image_tokens, tile_image
from maxllama.data.sources import read_bytes
from maxllama.model.decoder import Images

ImageInput = str | Path | np.ndarray  # a path or URL, or decoded pixels: [H, W] gray or [H, W, 3] RGB, uint8


class Prompt(NamedTuple):
    tokens: np.ndarray  # [B, T] int32, BOS first
    pixels: np.ndarray | None = None  # [B, tiles, 3, S, S] uint8: each row's tiles, blank past its own; None: text
    patch_mask: np.ndarray | None = None  # [B, T] bool: the <|patch|> positions of each row's image block

    def images(self) -> Images | None:
        """What `Decoder.__call__(images=...)` takes: the pixels normalised as in training."""
        if self.pixels is None:
            return None
        return Images.from_uint8(self.pixels, self.patch_mask)


def read_image(path: str | Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB of an image file (or fsspec URL), decoded by the data pipeline's safe decoder; a
    missing, unreadable or refused image is a UserError naming the file."""
    try:
        data = read_bytes(str(path))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        return decode_image(data)
    except BadImage as e:
        raise UserError(f"unusable image {path} ({e})") from None


def _rgb(image: ImageInput) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        return read_image(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise UserError(f"an image array must be uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
    return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image


def encode_prompt(tokenizer, text: str, vocab_size: int, *, image: ImageInput | None = None,
                  vision: VisionConfig | None = None) -> Prompt:
    """A prompt of one row: BOS first (documents start with BOS in training, so a prompt does too), then the
    image's block (tiles, canvas and tokens as the data pipeline makes them), then the text."""
    block, pixels = [], None
    if image is not None:
        if vision is None or not vision.enabled:
            raise UserError("the model has no vision tower (vision.enabled: false): it cannot read images")
        tiles = tile_image(_rgb(image), vision.image_size, vision.max_tiles)
        block = image_tokens(tiles.canvas, vision.tokens_per_tile, image_token_ids(tokenizer))
        pixels = tiles.pixels[None]
    tokens = np.asarray([tokenizer.bos_id, *block, *tokenizer.encode(text)], np.int32)[None]
    if tokens.max() >= vocab_size:
        raise UserError(f"the prompt has token ids beyond model.vocab_size ({vocab_size})")
    if pixels is None:
        return Prompt(tokens)
    # From the block's positions, not the ids: text a tokenizer turns into the patch id is no image position.
    patch_mask = np.zeros(tokens.shape, bool)
    patch_mask[0, 1:1 + len(block)] = np.asarray(block) == tokenizer.special["<|patch|>"]
    return Prompt(tokens, pixels, patch_mask)


def stack_prompts(prompts: Sequence[Prompt]) -> Prompt:
    """One batch of prompts of one length, all with an image or none; the tile budget is the largest row's."""
    if len({p.tokens.shape[1] for p in prompts}) != 1 or len({p.pixels is None for p in prompts}) != 1:
        raise ValueError("stack_prompts: the prompts need one length and all or none an image (see `batches`)")
    tokens = np.concatenate([p.tokens for p in prompts])
    if prompts[0].pixels is None:
        return Prompt(tokens)
    pixels = np.zeros((len(tokens), max(p.pixels.shape[1] for p in prompts), *prompts[0].pixels.shape[2:]),
                      np.uint8)
    row = 0
    for p in prompts:
        pixels[row:row + len(p.tokens), :p.pixels.shape[1]] = p.pixels
        row += len(p.tokens)
    return Prompt(tokens, pixels, np.concatenate([p.patch_mask for p in prompts]))


def batches(prompts: Sequence[Prompt], batch_size: int) -> Iterator[tuple[list[int], Prompt]]:
    """(indices, batch) covering every prompt once: prompts of one length, with or without an image, in
    batches of at most batch_size, so each distinct length compiles once."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.tokens.shape[1], p.pixels is None), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            yield chunk, stack_prompts([prompts[i] for i in chunk])
