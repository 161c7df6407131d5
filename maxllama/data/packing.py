"""Concatenate-and-split packing: documents (each as BOS, tokens, EOS) laid end to end, cut into windows.

Window i covers tokens [i*T, i*T + T] of the stream (T+1 tokens: inputs and next-token targets). Each
token also gets its document's segment id and its position inside that document, so attention never
crosses a document boundary and positions restart at 0 in every document. A target that belongs to the
next document is masked out of the loss: nothing in the window can predict it.
"""

from __future__ import annotations

import numpy as np


class PackedStream:
    def __init__(self, documents: list[np.ndarray], bos_id: int, eos_id: int, seq_len: int):
        lengths = np.array([len(d) + 2 for d in documents], dtype=np.int64)
        self.tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        for doc, start, length in zip(documents, self.doc_starts, lengths):
            self.tokens[start] = bos_id
            self.tokens[start + 1:start + length - 1] = doc
            self.tokens[start + length - 1] = eos_id
        self.seq_len = seq_len

    def __len__(self) -> int:
        """Number of complete windows."""
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def window(self, index: int) -> dict[str, np.ndarray]:
        t = self.seq_len
        span = np.arange(index * t, index * t + t + 1)
        doc = np.searchsorted(self.doc_starts, span, side="right") - 1
        positions = span - self.doc_starts[doc]
        segment = (doc - doc[0] + 1).astype(np.int32)  # 1-based within the window; 0 is left for padding
        return {
            "inputs": self.tokens[span[:-1]],
            "targets": self.tokens[span[1:]],
            "positions": positions[:-1].astype(np.int32),
            "segment_ids": segment[:-1],
            "loss_mask": (doc[1:] == doc[:-1]).astype(np.float32),
        }
