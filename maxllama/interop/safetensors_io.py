"""Streaming safetensors: read one tensor at a time through a memory map, write shards tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header ({name: dtype, shape, data_offsets}),
then raw little-endian bytes. Reading through `np.memmap` touches only the tensor asked for, so importing a
checkpoint never holds more than the tensor in flight beyond the model's own copy; bf16 maps to
`ml_dtypes.bfloat16`, which numpy lacks.
"""

from __future__ import annotations

import json
import math
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
    """(tensor entries, start of the data region); every entry checked, so reading a tensor cannot fail on a
    malformed or truncated file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size  # under 8 bytes: no header
            # checked before reading: a garbage length would allocate that much
            raw = f.read(length) if length <= size - 8 else None
    except OSError as e:
        raise InteropError(f"{path}: cannot read it ({e.strerror})") from None
    if raw is None:
        raise InteropError(f"{path}: not a safetensors file, or truncated: its header does not fit in its "
                           f"{size} bytes")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8; nested too deep
        raise InteropError(f"{path}: not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InteropError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise InteropError(f"{path}: tensor {name!r}: {problem}")
    return header, 8 + length


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry, data_size: int) -> str | None:
    """What is wrong with one header entry ({dtype, shape, data_offsets}), or None."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "the header entry must be an object with dtype, shape and data_offsets"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(entry["dtype"], str):
        return f"dtype must be a string, got {entry['dtype']!r:.40}"
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        return f"shape must be a list of sizes >= 0, got {shape!r:.40}"
    if math.prod(max(n, 1) for n in shape) >= 2**56:  # numpy refuses such shapes, even with a zero in them
        return f"shape {shape!r:.40} is too large"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.40}"
    if offsets[1] > data_size:
        return (f"data_offsets {offsets} run past the end of the file's {data_size} bytes of tensor data: the file "
                f"is truncated; copy or download it again")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is not None and offsets[1] - offsets[0] != np.dtype(dtype).itemsize * math.prod(shape):
        return f"{offsets[1] - offsets[0]} bytes do not hold a {entry['dtype']} tensor of shape {shape}"
    return None


class SafetensorsReader:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, read lazily by name."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_bytes()).get("weight_map")
            except (ValueError, AttributeError, RecursionError) as e:  # invalid JSON or UTF-8; not an object
                raise InteropError(f"{index}: malformed index ({e})") from None
            # Shards are files beside the index: a name with a folder or a line break in it is corruption.
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f.isprintable() and f == Path(f).name
                                                           for f in weight_map.values()):
                raise InteropError(f"{index}: malformed index: needs a 'weight_map' object of tensor name -> "
                                   f"shard file name")
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
        if entry["dtype"] not in DTYPES:  # checked here, not on opening: tensors never read may have any dtype
            raise InteropError(f"{path}: tensor '{name}': unsupported dtype {entry['dtype']!r:.40}")
        return np.memmap(path, dtype=DTYPES[entry["dtype"]], mode="r", offset=data_start + entry["data_offsets"][0],
                         shape=tuple(entry["shape"]))


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
