"""Image documents as rows read them: in memory (decoded at start-up) or in an image store (`maxllama prepare`).

A document is `BOS parts EOS` with its images' tiles. Besides its tokens (a TokenArrays) and tiles it keeps its
spans: the token ranges that a row never cuts, each holding one image and its tiles. An interleaved document's
spans are its image blocks, so it can be cut between them; an image-caption pair is one span, whole.

An image store is a token store (maxllama/data/store.py) with these arrays beside each split's tokens:

    STORE/{train,validation}/tiles        uint8 [tiles, 3, S, S], every image's tiles in document order
    STORE/{train,validation}/tile_starts  int64 first tile of every document
    STORE/{train,validation}/span_starts  int64 token offset of every span kept whole, and span_stops its end
    STORE/{train,validation}/span_tiles   int64 tiles of every span

Its manifest adds the tile geometry the images were cut for (`vision`), the images and tiles of each split and
the arrays' checksums. Opening it checks what opening a token store checks, the counts and checksums of the
index arrays (read whole), and the checksum of the tiles of a split of at most VERIFY_TILE_BYTES.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from maxllama.config import ConfigError
from maxllama.config.schema import VisionConfig
from maxllama.data.store import ROWS_PER_SHARD, SPLITS, SplitReader, StoredArray, TokenArrays, read_ranges

# What the values of each array count (see store.TOKEN_ARRAYS): the arrays' shift when parts are laid end to end.
IMAGE_ARRAYS: dict[str, str | None] = {"tiles": None, "tile_starts": "tiles", "span_starts": "tokens",
                                       "span_stops": "tokens", "span_tiles": None}
_INDEX = ("tile_starts", "span_starts", "span_stops", "span_tiles")
VERIFY_TILE_BYTES = 1 << 28  # splits with up to this many bytes of tiles have their checksum verified on opening


class ImageDocument(NamedTuple):
    """One document as a record becomes it."""

    tokens: np.ndarray  # int32, BOS ... EOS
    tiles: np.ndarray  # [n, 3, S, S] uint8: its images' tiles in order
    spans: list[tuple[int, int, int]]  # (start, stop, tiles) of each span kept whole, in its tokens


def _starts(lengths: np.ndarray) -> np.ndarray:
    return (np.cumsum(lengths) - lengths).astype(np.int64)


@dataclasses.dataclass
class ImageDocuments:
    """Documents laid end to end: tokens, tiles, where each document's tiles start, and the spans kept whole
    (global token offsets). One span per image."""

    tokens: TokenArrays
    tiles: np.ndarray | StoredArray  # [n_tiles, 3, S, S] uint8
    n_tiles: int
    tile_starts: np.ndarray
    span_starts: np.ndarray
    span_stops: np.ndarray
    span_tiles: np.ndarray

    @property
    def n_docs(self) -> int:
        return self.tokens.n_docs

    @property
    def n_tokens(self) -> int:
        return self.tokens.n_tokens

    @property
    def n_images(self) -> int:
        return len(self.span_starts)

    def doc_tiles(self) -> np.ndarray:
        return np.diff(np.append(self.tile_starts, self.n_tiles))

    def read_tiles(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        return read_ranges(self.tiles, ranges)

    def document(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, tiles) of one document."""
        def span(starts: np.ndarray, total: int) -> tuple[int, int]:
            return int(starts[doc]), int(starts[doc + 1]) if doc + 1 < len(starts) else total
        return (self.tokens.read_ranges([span(self.tokens.doc_starts, self.n_tokens)])[0],
                self.read_tiles([span(self.tile_starts, self.n_tiles)])[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """TOKEN_ARRAYS and IMAGE_ARRAYS of documents in memory (what `maxllama prepare` writes of one file)."""
        return {**self.tokens.arrays(), "tiles": self.tiles, "tile_starts": self.tile_starts,
                "span_starts": self.span_starts, "span_stops": self.span_stops, "span_tiles": self.span_tiles}

    @classmethod
    def from_documents(cls, docs: Sequence[ImageDocument], tile_side: int) -> ImageDocuments:
        doc_starts = _starts(np.asarray([len(d.tokens) for d in docs], np.int64))
        tokens = np.concatenate([np.zeros(0, np.int32), *(d.tokens for d in docs)])
        tiles = np.concatenate([np.zeros((0, 3, tile_side, tile_side), np.uint8), *(d.tiles for d in docs)])
        spans = np.asarray([(start + a, start + b, n) for d, start in zip(docs, doc_starts) for a, b, n in d.spans],
                           np.int64).reshape(-1, 3)
        return cls(TokenArrays(doc_starts, len(tokens), tokens_np=tokens), tiles, len(tiles),
                   _starts(np.asarray([len(d.tiles) for d in docs], np.int64)), spans[:, 0], spans[:, 1], spans[:, 2])


def tile_geometry(vision: VisionConfig) -> dict[str, int]:
    """What decides an image's tiles and tokens (beside the tokenizer): recorded in an image store's manifest."""
    return {"image_size": vision.image_size, "max_tiles": vision.max_tiles, "tokens_per_tile": vision.tokens_per_tile}


def open_image_documents(store: str, manifest: dict, tokens: dict[str, TokenArrays], vision: VisionConfig,
                         key: str) -> dict[str, ImageDocuments]:
    """{split: ImageDocuments} of an image store whose token part is open (`tokens`); `key` names the source in
    errors. Tiles stay on disk until read."""
    recorded, wanted = manifest.get("vision"), tile_geometry(vision)
    if recorded != wanted:
        raise ConfigError(f"{key}.path: {store} holds images tiled for {recorded}, but this config's vision section "
                          f"gives {wanted}; prepare it again with this config, or set those vision keys")
    return {split: _open_split(store, split, manifest["splits"][split], tokens[split], vision.image_size)
            for split in SPLITS}


def _open_split(store: str, split: str, entry: dict, tokens: TokenArrays, tile_side: int) -> ImageDocuments:
    reader = SplitReader(store, split)
    index = {}
    for name in _INDEX:
        array = reader.open(name)
        rows, what = (tokens.n_docs, "documents") if name == "tile_starts" else (entry["images"], "images")
        reader.check_shape(array, name, (rows,), f"{rows} {what}")
        index[name] = np.asarray(reader.read(array, name), np.int64)
        reader.check_digest(index[name], name, entry)
    tiles, n_tiles = reader.open("tiles"), entry["tiles"]
    reader.check_shape(tiles, "tiles", (n_tiles, 3, tile_side, tile_side), f"{n_tiles} tiles of {tile_side} pixels")
    starts = index["tile_starts"]
    reader.check(np.all(np.diff(starts) >= 0) and (starts[-1] <= n_tiles if len(starts) else n_tiles == 0)
                 and int(index["span_tiles"].sum()) == n_tiles, "tile_starts out of order or past the tiles")
    if tiles.size <= VERIFY_TILE_BYTES:
        reader.check_streamed_digest(tiles, "tiles", ROWS_PER_SHARD, entry)
    return ImageDocuments(tokens, StoredArray(reader.spec("tiles")), n_tiles, *(index[name] for name in _INDEX))
