"""Tokenizers: byte-level (default), a Hugging Face `tokenizer.json`, or a SentencePiece model.

Every tokenizer reserves the same special tokens, bos, eos, pad and the image tokens (docs/architecture.md,
"Tokenizers and special tokens"), so packing, multimodal samples and sampling never depend on which tokenizer
is in use. A tokenizer that already
has one of them (under its canonical name or a known alias such as `<|begin_of_text|>`) keeps its id; the
others are appended after its vocabulary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from maxllama.config import ConfigError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>", "<|image|>", "<|patch|>")
ALIASES = {
    "<|bos|>": ("<|begin_of_text|>", "<s>"),
    "<|eos|>": ("<|end_of_text|>", "</s>", "<|eot|>"),
    "<|pad|>": ("<|finetune_right_pad_id|>", "<pad>"),
}


class Tokenizer(Protocol):
    name: str
    special: dict[str, int]  # canonical special-token name -> id

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def fingerprint(self) -> str: ...


class SpecialIds:
    """bos/eos/pad accessors shared by every tokenizer."""

    special: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.special["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self.special["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self.special["<|pad|>"]


def _as_text(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class ByteTokenizer(SpecialIds):
    """UTF-8 bytes are tokens 0..255; special tokens follow. Lossless on any input, even invalid UTF-8."""

    name = "byte"
    n_bytes = 256

    def __init__(self) -> None:
        self.special = {token: self.n_bytes + i for i, token in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return self.n_bytes + len(self.special)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < self.n_bytes].astype(np.uint8)).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"


class HFTokenizer(SpecialIds):
    """A `tokenizers` JSON file (what Hugging Face models ship as tokenizer.json)."""

    def __init__(self, path: str | Path):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RawTokenizer
        self.path = Path(path)
        self.name = str(path)
        self.raw = RawTokenizer.from_file(str(path))
        self.special = {}
        for token in SPECIAL_TOKENS:
            found = next((self.raw.token_to_id(t) for t in (token, *ALIASES.get(token, ()))
                          if self.raw.token_to_id(t) is not None), None)
            if found is None:
                self.raw.add_special_tokens([AddedToken(token, special=True)])
                found = self.raw.token_to_id(token)
            self.special[token] = found
        # Special tokens are inserted as ids, never read from text: a `<|patch|>` spelled in the data stays text
        # (else it would become an image position with no tile behind it).
        self.raw.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.raw.encode(_as_text(text), add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.raw.decode([int(i) for i in np.asarray(ids)], skip_special_tokens=True)

    def fingerprint(self) -> str:
        return f"hf-{_file_digest(self.path)}"


class SentencePieceTokenizer(SpecialIds):
    """A SentencePiece `.model`; its own <s>/</s>/<pad> serve as bos/eos/pad, the rest are appended."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm
        self.path = Path(path)
        self.name = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_pieces = self.sp.get_piece_size()
        own = {"<|bos|>": self.sp.bos_id(), "<|eos|>": self.sp.eos_id(), "<|pad|>": self.sp.pad_id()}
        self.special, extra = {}, 0
        for token in SPECIAL_TOKENS:
            if own.get(token, -1) >= 0:
                self.special[token] = own[token]
            else:
                self.special[token] = self.n_pieces + extra
                extra += 1

    @property
    def vocab_size(self) -> int:
        return max(self.n_pieces, max(self.special.values()) + 1)

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.sp.encode(_as_text(text)), dtype=np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids) if int(i) < self.n_pieces and int(i) not in self.special.values()]
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return f"sentencepiece-{_file_digest(self.path)}"


def make_tokenizer(spec: str) -> Tokenizer:
    """'byte', a path to tokenizer.json, or a path to a SentencePiece .model."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"data.tokenizer: {spec} not found (use 'byte', a tokenizer.json or a SentencePiece .model)")
    try:
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
    except ImportError as e:
        raise ConfigError(f"data.tokenizer: {spec} needs the '{e.name}' package; pip install {e.name}") from None
    except Exception as e:  # the libraries raise their own types (and multi-line messages) for malformed files
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"data.tokenizer: {spec} could not be loaded ({reason}); is it a complete "
                          f"{'tokenizer.json' if path.suffix == '.json' else 'SentencePiece model'}?") from None
    raise ConfigError(f"data.tokenizer: {spec}: expected 'byte', a .json (Hugging Face) or .model (SentencePiece)")


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (the `tokenizers` library) with the special tokens reserved."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw.save(str(out_path))
    return HFTokenizer(out_path)
