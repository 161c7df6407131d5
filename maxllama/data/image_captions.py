"""Image-caption sources: JSONL records `{"image": PATH, "text": CAPTION}` become documents
`BOS <image block> caption EOS`, and rows of whole documents with a static budget of tiles.

An image path is taken relative to the JSONL file's folder (or is any fsspec URL). A record whose image is
missing, unreadable or refused is skipped whole and counted by reason, as is a record without an image or
without a caption: a caption is never trained on as text alone. The image-structure tokens are inputs, never
targets: the loss skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import Sequence

import numpy as np

from maxllama.config import ConfigError
from maxllama.config.schema import SourceConfig, VisionConfig
from maxllama.data.images import IMAGE_TOKENS, BadImage, decode_image, image_tokens, tile_image
from maxllama.data.packing import Batch, EpochLayouts
from maxllama.data.sources import held_out, read_bytes, resolve_files
from maxllama.data.store import SPLITS
from maxllama.data.tokenizer import Tokenizer


@dataclasses.dataclass
class ImageDocuments:
    tokens: list[np.ndarray]  # per document: int32 ids, BOS ... EOS
    tiles: list[np.ndarray]  # per document: [n, 3, image_size, image_size] uint8

    @property
    def n_docs(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def n_tiles(self) -> int:
        return sum(len(t) for t in self.tiles)


def image_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.special[f"<|{name}|>"] for name in IMAGE_TOKENS}


def load_image_captions(index: int, source: SourceConfig, tokenizer: Tokenizer, vision: VisionConfig,
                        val_fraction: float) -> tuple[dict[str, ImageDocuments], Counter]:
    if not vision.enabled:
        raise ConfigError(f"data.sources[{index}].format: image_caption needs a vision encoder (vision.enabled: true)")
    ids = image_token_ids(tokenizer)
    skipped: Counter = Counter()
    splits = {split: ImageDocuments([], []) for split in SPLITS}
    for path in resolve_files(source, f"data.sources[{index}].path"):
        folder = os.path.dirname(path)
        for line_number, line in enumerate(read_bytes(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict) or not record.get(source.image_field):
                skipped["caption_without_image"] += 1
                continue
            caption = record.get(source.field)
            if not isinstance(caption, str) or not caption.strip():
                skipped["image_without_caption"] += 1
                continue
            image = str(record[source.image_field])
            location = image if "://" in image or os.path.isabs(image) else os.path.join(folder, image)
            try:
                tiles = tile_image(decode_image(read_bytes(location)), vision.image_size, vision.max_tiles)
            except FileNotFoundError:
                if "://" not in location and not os.path.isdir(os.path.dirname(location)):
                    raise ConfigError(f"data.sources[{index}].path: {path}:{line_number}: the image folder "
                                      f"{os.path.dirname(location)} does not exist") from None
                skipped["missing_image"] += 1
                continue
            except BadImage as e:
                skipped[e.reason] += 1
                continue
            tokens = [tokenizer.bos_id, *image_tokens(tiles.canvas, vision.tokens_per_tile, ids),
                      *tokenizer.encode(caption), tokenizer.eos_id]
            split = "validation" if held_out(f"{path}:{line_number}", val_fraction) else "train"
            splits[split].tokens.append(np.asarray(tokens, np.int32))
            splits[split].tiles.append(tiles.pixels)
    return splits, skipped


class ImageRows(EpochLayouts):
    """Rows of whole documents in a per-epoch shuffled order, filled next-fit by two budgets: seq_len + 1
    tokens and `tiles` tiles. A document over either budget alone is skipped (counted in `too_long`)."""

    def __init__(self, docs: ImageDocuments, seq_len: int, tiles: int, vision: VisionConfig, tokenizer: Tokenizer,
                 seed: int):
        super().__init__()
        self.docs, self.seq_len, self.tile_budget, self.seed = docs, seq_len, tiles, seed
        self.pad_id, self.patch_id = tokenizer.pad_id, tokenizer.special["<|patch|>"]
        self.image_ids = np.asarray(sorted(image_token_ids(tokenizer).values()))
        self.tile_shape = (3, vision.image_size, vision.image_size)
        lengths = np.asarray([len(t) for t in docs.tokens])
        counts = np.asarray([len(t) for t in docs.tiles])
        self.fits = np.nonzero((lengths <= seq_len + 1) & (counts <= tiles))[0]
        self.too_long = len(lengths) - len(self.fits)
        self.lengths, self.counts = lengths, counts

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = self.fits[np.random.default_rng([self.seed, epoch]).permutation(len(self.fits))]
        sizes, used_tokens, used_tiles = [], self.seq_len + 2, self.tile_budget + 1  # start with a full row
        for doc in order:
            if used_tokens + self.lengths[doc] > self.seq_len + 1 or used_tiles + self.counts[doc] > self.tile_budget:
                sizes.append(0)
                used_tokens = used_tiles = 0
            sizes[-1] += 1
            used_tokens += self.lengths[doc]
            used_tiles += self.counts[doc]
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), order

    def read(self, rows: Sequence[int]) -> Batch:
        row_len = self.seq_len + 1
        b = len(rows)
        ids = np.full((b, row_len), self.pad_id, np.int32)
        segments = np.zeros((b, row_len), np.int32)
        positions = np.zeros((b, row_len), np.int32)
        pixels = np.zeros((b, self.tile_budget, *self.tile_shape), np.uint8)
        for r, row in enumerate(rows):
            at = tile = 0
            for segment, doc in enumerate(self.row_documents(int(row)), start=1):
                tokens, tiles = self.docs.tokens[doc], self.docs.tiles[doc]
                ids[r, at:at + len(tokens)] = tokens
                positions[r, at:at + len(tokens)] = np.arange(len(tokens))
                segments[r, at:at + len(tokens)] = segment
                pixels[r, tile:tile + len(tiles)] = tiles
                at, tile = at + len(tokens), tile + len(tiles)
        same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        predicts_text = ~np.isin(ids[:, 1:], self.image_ids)
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": positions[:, :-1],
                "segment_ids": segments[:, :-1], "loss_mask": (same_doc & predicts_text).astype(np.float32),
                "pixels": pixels, "patch_mask": ids[:, :-1] == self.patch_id}

    def row_documents(self, row: int) -> np.ndarray:
        epoch, index = self.locate(row)
        offsets, docs = self._epoch(epoch)
        return docs[offsets[index]:offsets[index + 1]]
