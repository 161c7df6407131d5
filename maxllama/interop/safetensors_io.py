"""Streaming safetensors: read one tensor at a time through a memory map, write shards tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header ({name: dtype, shape, data_offsets}),
then raw little-endian bytes. Reading through `np.memmap` touches only the tensor asked for, so importing a
checkpoint never holds more than the tensor in flight beyond the model's own copy; bf16 maps to
`ml_dtypes.bfloat16`, which numpy lacks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from maxllama.interop import InteropError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsReader:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, read lazily by name."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise InteropError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise InteropError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise InteropError(f"{path}: shard named in {INDEX_FILE} is missing")
            header, data_start = _read_header(path)
            for tensor, entry in header.items():
                self._entries[tensor] = (path, entry, data_start)

    def names(self) -> set[str]:
        return set(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def _entry(self, name: str):
        if name not in self._entries:
            raise InteropError(f"tensor '{name}' is missing from the checkpoint")
        return self._entries[name]

    def read(self, name: str) -> np.ndarray:
        path, entry, data_start = self._entry(name)
        if entry["dtype"] not in DTYPES:
            raise InteropError(f"tensor '{name}': unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise InteropError(f"tensor '{name}' in {path.name}: byte size does not match shape {shape}")
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def write_file(path: Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    tensors = list(tensors)
    header, offset = {}, 0
    for name, array in tensors:
        size = array.dtype.itemsize * array.size
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())


def write_sharded(directory: Path, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> None:
    """Write tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) as
    they arrive, holding one shard in memory, plus the index that `transformers` reads."""
    written: list[tuple[Path, list[str]]] = []
    shard: list[tuple[str, np.ndarray]] = []
    size = total = 0

    def flush() -> None:
        path = directory / f"shard-{len(written):05d}.partial"
        write_file(path, shard, {"format": "pt"})
        written.append((path, [name for name, _ in shard]))
        shard.clear()

    for name, array in tensors:
        if shard and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard.append((name, array))
        size += array.nbytes
        total += array.nbytes
    if shard or not written:
        flush()
    weight_map = {}
    for i, (path, names) in enumerate(written):
        final = SINGLE_FILE if len(written) == 1 else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    if len(written) > 1:
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=2))
