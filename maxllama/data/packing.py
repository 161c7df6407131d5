"""Packing documents (`BOS tokens EOS`, laid end to end in `TokenArrays`) into rows of seq_len + 1 tokens.

Every row carries, per token, its document's segment id (1-based within the row; 0 is padding) and its
position inside that document, so attention never crosses documents and positions restart at 0 in each.
A target that belongs to another document (or is padding) is masked out of the loss.

concat:    rows are consecutive slices of the stream; no padding, documents cut where rows end.
first_fit: documents longer than a row are split into row-sized pieces (never truncated), then the pieces
           of each block of `block` pieces, in a shuffled order, are packed first-fit-decreasing into rows;
           the rest of a row is padding. The layout of an epoch is a function of (seed, epoch), so any row
           can be found without reading tokens that come before it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maxllama.data.store import TokenArrays

Batch = dict[str, np.ndarray]


def _rows(pieces_per_row: Sequence[Sequence[tuple[int, int]]], tokens: TokenArrays, row_len: int,
          pad_id: int) -> Batch:
    """Assemble rows from (start, stop) token ranges; segments/positions from the document starts."""
    flat = [piece for row in pieces_per_row for piece in row]
    data = tokens.read_ranges(flat)
    b = len(pieces_per_row)
    ids = np.full((b, row_len), pad_id, np.int32)
    segments = np.zeros((b, row_len), np.int32)
    positions = np.zeros((b, row_len), np.int32)
    k = 0
    for r, row in enumerate(pieces_per_row):
        at = 0
        for start, stop in row:
            n = stop - start
            span = np.arange(start, stop)
            doc = np.searchsorted(tokens.doc_starts, span, side="right") - 1
            ids[r, at:at + n] = data[k]
            positions[r, at:at + n] = span - tokens.doc_starts[doc]
            segments[r, at:at + n] = doc
            at += n
            k += 1
        filled = segments[r, :at]
        segments[r, :at] = np.unique(filled, return_inverse=True)[1].reshape(-1) + 1  # 1-based per row
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "positions": positions[:, :-1],
            "segment_ids": segments[:, :-1], "loss_mask": same_doc.astype(np.float32)}


class ConcatWindows:
    """Row i is tokens [i*T, i*T + T] of the stream (T + 1 tokens: inputs and next-token targets)."""

    def __init__(self, tokens: TokenArrays, seq_len: int, pad_id: int):
        self.tokens, self.seq_len, self.pad_id = tokens, seq_len, pad_id

    def __len__(self) -> int:
        return max(0, (self.tokens.n_tokens - 1) // self.seq_len)

    def read(self, rows: Sequence[int]) -> Batch:
        t = self.seq_len
        return _rows([[(int(i) * t, int(i) * t + t + 1)] for i in rows], self.tokens, t + 1, self.pad_id)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) from first-fit-decreasing; deterministic (stable sort)."""
    order = np.argsort(-lengths, kind="stable")
    remaining = np.zeros(len(lengths), np.int64)
    bins: list[list[int]] = []
    for item in order:
        fits = np.nonzero(remaining[:len(bins)] >= lengths[item])[0]
        if len(fits):
            target = int(fits[0])
        else:
            target = len(bins)
            bins.append([])
            remaining[target] = capacity
        bins[target].append(int(item))
        remaining[target] -= lengths[item]
    return bins


class EpochLayouts:
    """Rows laid out per epoch (a function of the seed and the epoch), found by a global row index: epochs
    differ in row count. A subclass gives `_layout(epoch)` -> (row offsets, items): row r of the epoch holds
    items[offsets[r]:offsets[r + 1]]."""

    def __init__(self) -> None:
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epoch_rows: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._epoch(0)[0]) - 1

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat arrays, not lists of lists: an epoch has millions of items. Cached, the latest few epochs."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 3:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = self._layout(epoch)
        return self._layouts[epoch]

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within epoch) of a global row index."""
        epoch, first = 0, 0
        while True:
            if epoch not in self._epoch_rows:
                self._epoch_rows[epoch] = len(self._epoch(epoch)[0]) - 1
            if row < first + self._epoch_rows[epoch]:
                return epoch, row - first
            first += self._epoch_rows[epoch]
            epoch += 1


class FirstFitRows(EpochLayouts):
    """Rows of whole document pieces, first-fit packed per block of a per-epoch shuffled piece order."""

    def __init__(self, tokens: TokenArrays, seq_len: int, pad_id: int, seed: int, block: int = 1024):
        super().__init__()
        self.tokens, self.seq_len, self.pad_id, self.seed, self.block = tokens, seq_len, pad_id, seed, block
        row_len = seq_len + 1
        starts, lengths = tokens.doc_starts, tokens.doc_lengths()
        pieces = np.maximum(1, -(-lengths // row_len))
        doc_of_piece = np.repeat(np.arange(len(lengths)), pieces)
        offset = np.arange(len(doc_of_piece)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.piece_start = starts[doc_of_piece] + offset * row_len
        self.piece_stop = np.minimum(self.piece_start + row_len, starts[doc_of_piece] + lengths[doc_of_piece])
        self.split_documents = int(np.sum(pieces > 1))

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.piece_start))
        lengths = self.piece_stop - self.piece_start
        pieces, sizes = [], []
        for b in range(0, len(order), self.block):
            block = order[b:b + self.block]
            for row in first_fit_decreasing(lengths[block], self.seq_len + 1):
                pieces.append(block[row])
                sizes.append(len(row))
        return np.concatenate([[0], np.cumsum(sizes)]), np.concatenate(pieces)

    def row_pieces(self, epoch: int, row: int) -> np.ndarray:
        offsets, pieces = self._epoch(epoch)
        return pieces[offsets[row]:offsets[row + 1]]

    def read(self, rows: Sequence[int]) -> Batch:
        layout = []
        for row in rows:
            epoch, index = self.locate(int(row))
            layout.append([(int(self.piece_start[p]), int(self.piece_stop[p])) for p in self.row_pieces(epoch, index)])
        return _rows(layout, self.tokens, self.seq_len + 1, self.pad_id)
