"""Rows of image documents, filled by two budgets: seq_len + 1 tokens and a static number of tiles.

A document over either budget is cut into pieces that fit, between its spans kept whole (image_store.py): an
interleaved document between its parts or inside a long text part, never inside an image block. A document
that cannot be cut so (an image-caption pair, which is one span, or an image block alone over a budget) is
skipped and counted in `too_long`. As with first_fit text rows, a piece's positions go on from the document's
and no token attends to another piece; rows take the pieces next-fit in a per-epoch shuffled order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maxllama.config.schema import VisionConfig
from maxllama.data.image_captions import image_token_ids
from maxllama.data.image_store import ImageDocuments
from maxllama.data.packing import Batch, EpochLayouts
from maxllama.data.tokenizer import Tokenizer


def cut_document(length: int, spans: np.ndarray, row_len: int, tiles: int) -> list[tuple[int, int, int]] | None:
    """Pieces (start, stop, tiles) of a document of `length` tokens, each at most row_len tokens and `tiles`
    tiles, cut outside its `spans` [(start, stop, tiles)] (sorted, disjoint); None when a span alone is over."""
    pieces: list[tuple[int, int, int]] = []
    start = used = 0

    def cut(at: int) -> None:
        nonlocal start, used
        pieces.append((start, at, used))
        start, used = at, 0

    for a, b, n in spans.tolist():
        if b - a > row_len or n > tiles:
            return None
        while a - start > row_len:  # text before the span
            cut(start + row_len)
        if b - start > row_len or used + n > tiles:
            cut(a)
        used += n
    while length - start > row_len:
        cut(start + row_len)
    cut(length)
    return pieces


class ImageRows(EpochLayouts):
    """Rows of document pieces (see the module's docstring)."""

    def __init__(self, docs: ImageDocuments, seq_len: int, tiles: int, vision: VisionConfig, tokenizer: Tokenizer,
                 seed: int):
        super().__init__()
        self.docs, self.seq_len, self.tile_budget, self.seed = docs, seq_len, tiles, seed
        self.pad_id, self.patch_id = tokenizer.pad_id, tokenizer.special["<|patch|>"]
        self.image_ids = np.asarray(sorted(image_token_ids(tokenizer).values()))
        self.tile_shape = (3, vision.image_size, vision.image_size)
        self._cut(docs.tokens.doc_lengths(), docs.doc_tiles())

    def _cut(self, lengths: np.ndarray, counts: np.ndarray) -> None:
        """The pieces of every document, in document order: a document that fits is one piece."""
        docs, row_len = self.docs, self.seq_len + 1
        pieces = ((lengths <= row_len) & (counts <= self.tile_budget)).astype(np.int64)  # per document
        cuts = {}
        for doc in np.nonzero(pieces == 0)[0]:
            first, last = np.searchsorted(docs.span_starts, docs.tokens.doc_starts[doc] + [0, lengths[doc]])
            spans = np.stack([docs.span_starts[first:last] - docs.tokens.doc_starts[doc],
                              docs.span_stops[first:last] - docs.tokens.doc_starts[doc],
                              docs.span_tiles[first:last]], axis=1)
            cuts[doc] = cut_document(int(lengths[doc]), spans, row_len, self.tile_budget)
            pieces[doc] = len(cuts[doc] or ())
        self.too_long = sum(c is None for c in cuts.values())
        self.split_documents = sum(c is not None for c in cuts.values())
        doc = np.repeat(np.arange(len(lengths)), pieces)
        self.offset = np.zeros(len(doc), np.int64)  # where a piece starts in its document
        self.length, self.tiles = lengths[doc].astype(np.int64), counts[doc].astype(np.int64)
        tile_offset = np.zeros(len(doc), np.int64)
        first_piece = np.cumsum(pieces) - pieces
        for d, cut in cuts.items():
            if cut:
                at = first_piece[d] + np.arange(len(cut))
                starts, stops, tiles = np.asarray(cut, np.int64).T
                self.offset[at], self.length[at], self.tiles[at] = starts, stops - starts, tiles
                tile_offset[at] = np.cumsum(tiles) - tiles
        self.token_start = docs.tokens.doc_starts[doc] + self.offset
        self.tile_start = docs.tile_starts[doc] + tile_offset

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.length))
        sizes, used_tokens, used_tiles = [], self.seq_len + 2, self.tile_budget + 1  # start with a full row
        for piece in order:
            if used_tokens + self.length[piece] > self.seq_len + 1 or used_tiles + self.tiles[piece] > self.tile_budget:
                sizes.append(0)
                used_tokens = used_tiles = 0
            sizes[-1] += 1
            used_tokens += self.length[piece]
            used_tiles += self.tiles[piece]
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), order

    def row_pieces(self, row: int) -> np.ndarray:
        epoch, index = self.locate(row)
        offsets, pieces = self._epoch(epoch)
        return pieces[offsets[index]:offsets[index + 1]]

    def read(self, rows: Sequence[int]) -> Batch:
        row_len = self.seq_len + 1
        b = len(rows)
        layout = [self.row_pieces(int(row)) for row in rows]
        flat = np.concatenate([np.zeros(0, np.int64), *layout])
        tokens = self.docs.tokens.read_ranges(list(zip(self.token_start[flat], self.token_start[flat] + self.length[flat])))
        tiles = self.docs.read_tiles(list(zip(self.tile_start[flat], self.tile_start[flat] + self.tiles[flat])))
        ids = np.full((b, row_len), self.pad_id, np.int32)
        segments = np.zeros((b, row_len), np.int32)
        positions = np.zeros((b, row_len), np.int32)
        pixels = np.zeros((b, self.tile_budget, *self.tile_shape), np.uint8)
        k = 0
        for r, pieces in enumerate(layout):
            at = tile = 0
            for segment, piece in enumerate(pieces, start=1):
                n, m = len(tokens[k]), len(tiles[k])
                ids[r, at:at + n] = tokens[k]
                positions[r, at:at + n] = np.arange(self.offset[piece], self.offset[piece] + n)
                segments[r, at:at + n] = segment
                pixels[r, tile:tile + m] = tiles[k]
                at, tile, k = at + n, tile + m, k + 1
        same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        predicts_text = ~np.isin(ids[:, 1:], self.image_ids)
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": positions[:, :-1],
                "segment_ids": segments[:, :-1], "loss_mask": (same_doc & predicts_text).astype(np.float32),
                "pixels": pixels, "patch_mask": ids[:, :-1] == self.patch_id}
