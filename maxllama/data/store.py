"""Token arrays: documents as `BOS tokens EOS` laid end to end, plus where each document starts.

Two backings share one reader interface: numpy (small data tokenized at start-up) and a TensorStore token
store on disk or in a bucket (zarr3, chunked, zstd-compressed), written once by `maxllama prepare`:

    STORE/manifest.json                 tokenizer, sources, counts, checksums, skipped records
    STORE/{train,validation}/tokens      flat token array (uint16 when the vocabulary fits, else uint32)
    STORE/{train,validation}/doc_starts  int64 start of every document

A store is used only when complete and intact. The manifest is written last, so a folder without one (but
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
    skipped = manifest.get("skipped", {})
    if not isinstance(skipped, dict) or not all(map(_is_count, skipped.values())):
        return "skipped is not a mapping of reason to count"
    return None


def _open_split(store: str, split: str, entry: dict) -> TokenArrays:
    """One split's arrays, checked against the manifest's counts and checksums (see the module docstring for
    how far)."""
    import tensorstore as ts

    def corrupt(problem: str) -> ConfigError:
        return ConfigError(f"{store}/{split}: {problem}; the store is corrupt: {_remake(store)}")

    def check(ok: bool, problem: str) -> None:
        if not ok:
            raise corrupt(problem)

    def unreadable(name: str, e: ValueError) -> ConfigError:
        """TensorStore raises ValueError for missing or undecodable metadata and chunks."""
        return corrupt(f"{name} unreadable ({' '.join(str(e).split())[:160]})")

    def read(array, name: str) -> np.ndarray:
        try:
            return array.read().result()
        except ValueError as e:
            raise unreadable(name, e) from None

    arrays = {}
    for name in ("doc_starts", "tokens"):
        try:
            arrays[name] = ts.open(array_spec(f"{store}/{split}/{name}"), open=True).result()
        except ValueError as e:
            raise unreadable(name, e) from None
    n_docs, n_tokens = entry["documents"], entry["tokens"]
    check(arrays["tokens"].shape == (n_tokens,), f"tokens of shape {arrays['tokens'].shape}, the manifest says {n_tokens}")
    check(arrays["doc_starts"].shape == (n_docs,), f"doc_starts of shape {arrays['doc_starts'].shape}, the manifest "
                                                    f"says {n_docs} documents")
    starts = np.asarray(read(arrays["doc_starts"], "doc_starts"), np.int64)
    # Every document is at least BOS EOS, laid end to end from 0.
    check(starts[0] == 0 and np.all(np.diff(starts) >= 2) and starts[-1] <= n_tokens - 2 if n_docs else n_tokens == 0,
          "doc_starts out of order or past the tokens")
    if "starts_sha256" in entry:  # stores prepared before this checksum existed lack it
        check(hashlib.sha256(starts.tobytes()).hexdigest() == entry["starts_sha256"],
              "doc_starts differ from the manifest's checksum (starts_sha256)")
    if n_tokens <= VERIFY_TOKENS:
        digest = hashlib.sha256()
        for a in range(0, n_tokens, CHUNK_TOKENS):
            digest.update(read(arrays["tokens"][a:min(a + CHUNK_TOKENS, n_tokens)], "tokens").tobytes())
        check(digest.hexdigest() == entry["sha256"], f"tokens differ from the manifest's checksum (splits.{split}.sha256)")
    return TokenArrays(starts, n_tokens, tokens_spec=array_spec(f"{store}/{split}/tokens"))


def open_store(store: str) -> tuple[dict, dict[str, TokenArrays]]:
    """(manifest, {split: TokenArrays}) of a prepared token store, checked against its manifest; tokens stay on
    disk until read."""
    manifest = read_manifest(store)
    return manifest, {split: _open_split(store, split, manifest["splits"][split]) for split in SPLITS}
