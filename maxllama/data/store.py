"""Token arrays: documents as `BOS tokens EOS` laid end to end, plus where each document starts.

Two backings share one reader interface: numpy (small data tokenized at start-up) and a TensorStore token
store on disk or in a bucket (zarr3, chunked, zstd-compressed), written once by `maxllama prepare`:

    STORE/manifest.json                 tokenizer, sources, counts, checksums, skipped records
    STORE/{train,validation}/tokens      flat token array (uint16 when the vocabulary fits, else uint32)
    STORE/{train,validation}/doc_starts  int64 start of every document
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maxllama.config import ConfigError

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
CHUNK_TOKENS = 1 << 20


@dataclasses.dataclass
class TokenArrays:
    """A flat token array (numpy, or a TensorStore opened lazily) and document starts (numpy)."""

    doc_starts: np.ndarray
    n_tokens: int
    tokens_np: np.ndarray | None = None
    tokens_spec: dict | None = None  # TensorStore spec: picklable, opened on first read in each process
    _tokens_ts: Any = dataclasses.field(default=None, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens_ts"] = None  # TensorStore handles do not cross process boundaries; reopen there
        return state

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(np.append(self.doc_starts, self.n_tokens))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Token slices [start, stop) as int32 arrays; TensorStore reads are issued together, then awaited."""
        if self.tokens_np is not None:
            return [self.tokens_np[a:b].astype(np.int32) for a, b in ranges]
        if self._tokens_ts is None:
            import tensorstore as ts
            self._tokens_ts = ts.open(self.tokens_spec, open=True).result()
        futures = [self._tokens_ts[a:b].read() for a, b in ranges]
        return [f.result().astype(np.int32) for f in futures]


def concatenate_documents(documents: Sequence[np.ndarray], bos_id: int, eos_id: int) -> TokenArrays:
    lengths = np.array([len(d) + 2 for d in documents], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(documents) else np.zeros(0, np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    for doc, start, length in zip(documents, starts, lengths):
        tokens[start] = bos_id
        tokens[start + 1:start + length - 1] = doc
        tokens[start + length - 1] = eos_id
    return TokenArrays(starts, len(tokens), tokens_np=tokens)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _kvstore(path: str) -> dict | str:
    return path if "://" in path else {"driver": "file", "path": str(Path(path).absolute())}


def array_spec(path: str, *, shape: int | None = None, dtype: str | None = None) -> dict:
    spec: dict = {"driver": "zarr3", "kvstore": _kvstore(path)}
    if shape is not None:
        spec["metadata"] = {
            "shape": [shape], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [CHUNK_TOKENS]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}],
        }
    return spec


def create_array(path: str, shape: int, dtype: str):
    import tensorstore as ts
    return ts.open(array_spec(path, shape=shape, dtype=dtype), create=True, delete_existing=True).result()


def read_manifest(store: str) -> dict:
    path = f"{store}/{MANIFEST}"
    try:
        if "://" in str(store):
            import fsspec
            with fsspec.open(path, "r") as f:
                return json.loads(f.read())
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{store}: not a token store (no {MANIFEST}); create one with `maxllama prepare`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: corrupt manifest ({e})") from None


def open_store(store: str) -> tuple[dict, dict[str, TokenArrays]]:
    """(manifest, {split: TokenArrays}) of a prepared token store; tokens stay on disk until read."""
    import tensorstore as ts
    manifest = read_manifest(store)
    splits = {}
    for split in SPLITS:
        starts_path = f"{store}/{split}/doc_starts"
        try:
            starts = ts.open(array_spec(starts_path), open=True).result().read().result()
        except ValueError as e:
            raise ConfigError(f"{starts_path}: unreadable token store array ({str(e)[:160]})") from None
        splits[split] = TokenArrays(np.asarray(starts, np.int64), manifest["splits"][split]["tokens"],
                                    tokens_spec=array_spec(f"{store}/{split}/tokens"))
    return manifest, splits
