"""Byte-level tokenizer: UTF-8 bytes are tokens 0..255; special tokens follow.

Special tokens (those of LLAMA4_SPEC.md, image tokens included) are reserved in every tokenizer so that
multimodal and chat data never collide with text bytes.
"""

from __future__ import annotations

import numpy as np

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>", "<|image|>", "<|patch|>")


class ByteTokenizer:
    n_bytes = 256

    def __init__(self) -> None:
        self.special = {name: self.n_bytes + i for i, name in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return self.n_bytes + len(self.special)

    @property
    def bos_id(self) -> int:
        return self.special["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self.special["<|pad|>"]

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < self.n_bytes].astype(np.uint8)).decode("utf-8", errors="replace")


def make_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer: unknown tokenizer {name!r}")
