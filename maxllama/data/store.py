"""Token arrays: documents as `BOS tokens EOS` laid end to end, plus where each document starts.

Two backings share one reader interface: numpy (small data tokenized at start-up) and a TensorStore token
store on disk or in a bucket (zarr3, chunked, zstd-compressed), written once by `maxllama prepare`:

    STORE/manifest.json                 tokenizer, sources, counts, checksums, skipped records
    STORE/{train,validation}/tokens      flat token array (uint16 when the vocabulary fits, else uint32)
    STORE/{train,validation}/doc_starts  int64 start of every document

An image store (maxllama/data/image_store.py) is a token store with each split's tiles and their index beside
the tokens. A store is used only when complete and intact. The manifest is written last, so a folder without one (but
with `.parts/`) is an interrupted `maxllama prepare`, refused. Opening a store checks, cheaply, that the
arrays are the ones the manifest describes: always the token and document counts (array shapes) and the
document starts (read whole anyway: their order, and their sha256 where the manifest has one); the sha256 of
the tokens themselves only for splits of at most VERIFY_TOKENS tokens, which a local disk reads in under a
second. A larger split is trusted to its counts; a corrupt chunk in it fails when read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maxllama.config import ConfigError

MANIFEST = "manifest.json"
PARTS = ".parts"  # `maxllama prepare`'s finished work units, until the store is assembled
SPLITS = ("train", "validation")
CHUNK_TOKENS = 1 << 20
VERIFY_TOKENS = 1 << 26  # splits up to this size have their token checksum verified on opening
ROWS_PER_SHARD = 64  # arrays of rows (image tiles): rows per file, each row readable alone
TOKEN_STORE, IMAGE_STORE = "maxllama-token-store-v1", "maxllama-image-store-v1"  # the manifest's format


# A split's stored arrays, each with the array whose rows its values count: laying parts end to end shifts them.
TOKEN_ARRAYS: dict[str, str | None] = {"tokens": None, "doc_starts": "tokens"}


@dataclasses.dataclass
class StoredArray:
    """A TensorStore array, opened on first read in each process: its spec is picklable, its handle is not."""

    spec: dict
    _handle: Any = dataclasses.field(default=None, repr=False)

    def __getstate__(self):
        return {"spec": self.spec, "_handle": None}  # reopened in the process that reads

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Slices [start, stop) of the first axis; the reads are issued together, then awaited."""
        if self._handle is None:
            import tensorstore as ts
            self._handle = ts.open(self.spec, open=True).result()
        futures = [self._handle[a:b].read() for a, b in ranges]
        return [f.result() for f in futures]


def read_ranges(array: np.ndarray | StoredArray, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Slices [start, stop) of the first axis of an array in memory or in a store."""
    if isinstance(array, np.ndarray):
        return [array[a:b] for a, b in ranges]
    return array.read_ranges(ranges)


@dataclasses.dataclass
class TokenArrays:
    """A flat token array (numpy, or a TensorStore opened lazily) and document starts (numpy)."""

    doc_starts: np.ndarray
    n_tokens: int
    tokens_np: np.ndarray | None = None
    tokens_stored: StoredArray | None = None

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(np.append(self.doc_starts, self.n_tokens))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Token slices [start, stop) as int32 arrays."""
        tokens = self.tokens_np if self.tokens_np is not None else self.tokens_stored
        return [part.astype(np.int32) for part in read_ranges(tokens, ranges)]

    def arrays(self) -> dict[str, np.ndarray]:
        """The TOKEN_ARRAYS of tokens in memory (what `maxllama prepare` writes of one file)."""
        return {"tokens": self.tokens_np, "doc_starts": self.doc_starts}


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


def array_spec(path: str, *, shape: int | tuple[int, ...] | None = None, dtype: str | None = None,
               chunk: tuple[int, ...] | None = None, read_chunk: tuple[int, ...] | None = None) -> dict:
    """A zarr3 array; with a shape, a new one's metadata: zstd-compressed chunks of `chunk` (default CHUNK_TOKENS
    of a 1-D array). With `read_chunk`, each chunk is a shard (one file) of separately readable chunks of that
    shape: many small reads without as many files."""
    spec: dict = {"driver": "zarr3", "kvstore": _kvstore(path)}
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]
        if read_chunk is not None:
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(read_chunk), "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
        spec["metadata"] = {
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk or (CHUNK_TOKENS,))}},
            "codecs": codecs,
        }
    return spec


def create_array(path: str, shape: int | tuple[int, ...], dtype: str, **layout):
    """A new (or replaced) array; `layout`: array_spec's chunk and read_chunk."""
    import tensorstore as ts
    return ts.open(array_spec(path, shape=shape, dtype=dtype, **layout), create=True, delete_existing=True).result()


def row_layout(row_shape: tuple[int, ...]) -> dict:
    """How an array whose rows have this shape is chunked (array_spec's chunk, read_chunk): a 1-D array in chunks
    of CHUNK_TOKENS; an array of rows (tiles) in shards of ROWS_PER_SHARD rows, each row readable alone, since a
    batch reads a few images' tiles at a time."""
    return {"chunk": (ROWS_PER_SHARD, *row_shape), "read_chunk": (1, *row_shape)} if row_shape else {}


def checksum_key(name: str) -> str:
    """The key of a stored array's sha256 in its split's manifest entry."""
    return {"tokens": "sha256", "doc_starts": "starts_sha256"}.get(name, f"{name}_sha256")


def _remake(store: str) -> str:
    return f"remove {store} and re-run the `maxllama prepare` command that made it"


def read_manifest(store: str) -> dict:
    path = f"{store}/{MANIFEST}"
    try:
        if "://" in str(store):
            import fsspec
            with fsspec.open(path, "rb") as f:
                manifest = json.loads(f.read())
        else:
            manifest = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        if "://" not in str(store) and (Path(store) / PARTS).is_dir():
            raise ConfigError(f"{store}: an unfinished token store ({PARTS}/ but no {MANIFEST}: `maxllama prepare` "
                              f"was interrupted); re-run the same `maxllama prepare ... --out {store}` command, "
                              f"which resumes where it stopped") from None
        raise ConfigError(f"{store}: not a token store (no {MANIFEST}); create one with `maxllama prepare`") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
        raise ConfigError(f"{path}: corrupt manifest ({e}); {_remake(store)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ConfigError(f"{path}: corrupt manifest ({problem}); {_remake(store)}")
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest) -> str | None:
    """What a manifest lacks of what reading the store needs, or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not all(isinstance(tokenizer.get(k), str) for k in ("spec", "fingerprint")):
        return "no tokenizer.spec and tokenizer.fingerprint"
    splits = manifest.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        if not (isinstance(entry, dict) and _is_count(entry.get("tokens")) and _is_count(entry.get("documents"))
                and isinstance(entry.get("sha256"), str)):
            return f"no splits.{split} with tokens, documents and sha256"
    for key in ("skipped", "skipped_images"):
        counts = manifest.get(key, {})
        if not isinstance(counts, dict) or not all(map(_is_count, counts.values())):
            return f"{key} is not a mapping of reason to count"
    if is_image_store(manifest):
        if not isinstance(manifest.get("vision"), dict):
            return "no vision (the tile geometry)"
        for split in SPLITS:
            if not all(_is_count(splits[split].get(k)) for k in ("images", "tiles")):
                return f"no splits.{split} images and tiles"
    return None


def is_image_store(manifest: dict) -> bool:
    return manifest.get("format") == IMAGE_STORE


class SplitReader:
    """Opens and reads one split's arrays of a store; any problem is a ConfigError that says the store is corrupt
    and how to remake it."""

    def __init__(self, store: str, split: str):
        self.store, self.split = store, split

    def corrupt(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.store}/{self.split}: {problem}; the store is corrupt: {_remake(self.store)}")

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            raise self.corrupt(problem)

    def _unreadable(self, name: str, e: ValueError) -> ConfigError:
        """TensorStore raises ValueError for missing or undecodable metadata and chunks."""
        return self.corrupt(f"{name} unreadable ({' '.join(str(e).split())[:160]})")

    def spec(self, name: str) -> dict:
        return array_spec(f"{self.store}/{self.split}/{name}")

    def open(self, name: str):
        import tensorstore as ts
        try:
            return ts.open(self.spec(name), open=True).result()
        except ValueError as e:
            raise self._unreadable(name, e) from None

    def read(self, array, name: str) -> np.ndarray:
        try:
            return array.read().result()
        except ValueError as e:
            raise self._unreadable(name, e) from None

    def check_shape(self, array, name: str, shape: tuple[int, ...], what: str) -> None:
        self.check(array.shape == shape, f"{name} of shape {array.shape}, the manifest says {what}")

    def _check_sha256(self, digest: str, name: str, entry: dict) -> None:
        key = checksum_key(name)
        self.check(digest == entry[key], f"{name} differ from the manifest's checksum (splits.{self.split}.{key})")

    def check_digest(self, data: np.ndarray, name: str, entry: dict) -> None:
        """The sha256 of an array read whole, where the manifest has one (stores prepared before some checksums
        existed lack them)."""
        if checksum_key(name) in entry:
            self._check_sha256(hashlib.sha256(data.tobytes()).hexdigest(), name, entry)

    def check_streamed_digest(self, array, name: str, step: int, entry: dict) -> None:
        """The sha256 of an array too large to hold at once, read `step` rows at a time."""
        digest, rows = hashlib.sha256(), array.shape[0]
        for a in range(0, rows, step):
            digest.update(self.read(array[a:min(a + step, rows)], name).tobytes())
        self._check_sha256(digest.hexdigest(), name, entry)


def _open_split(store: str, split: str, entry: dict) -> TokenArrays:
    """One split's arrays, checked against the manifest's counts and checksums (see the module docstring for
    how far)."""
    reader = SplitReader(store, split)
    arrays = {name: reader.open(name) for name in ("doc_starts", "tokens")}
    n_docs, n_tokens = entry["documents"], entry["tokens"]
    reader.check_shape(arrays["tokens"], "tokens", (n_tokens,), str(n_tokens))
    reader.check_shape(arrays["doc_starts"], "doc_starts", (n_docs,), f"{n_docs} documents")
    starts = np.asarray(reader.read(arrays["doc_starts"], "doc_starts"), np.int64)
    # Every document is at least BOS EOS, laid end to end from 0.
    reader.check(starts[0] == 0 and np.all(np.diff(starts) >= 2) and starts[-1] <= n_tokens - 2 if n_docs
                 else n_tokens == 0, "doc_starts out of order or past the tokens")
    reader.check_digest(starts, "doc_starts", entry)
    if n_tokens <= VERIFY_TOKENS:
        reader.check_streamed_digest(arrays["tokens"], "tokens", CHUNK_TOKENS, entry)
    return TokenArrays(starts, n_tokens, tokens_stored=StoredArray(reader.spec("tokens")))


def open_store(store: str) -> tuple[dict, dict[str, TokenArrays]]:
    """(manifest, {split: TokenArrays}) of a prepared token store, checked against its manifest; tokens stay on
    disk until read."""
    manifest = read_manifest(store)
    return manifest, {split: _open_split(store, split, manifest["splits"][split]) for split in SPLITS}
