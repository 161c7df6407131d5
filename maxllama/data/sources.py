"""Document sources: plain-text files, JSONL (a named field), Parquet (a named column), this Python's
standard library, local or anywhere fsspec reaches (gs://, s3://, ...).

Bad records never stop a run and are never dropped silently: each one is skipped (or repaired) and counted
by reason in a `Counter` the caller reports (`maxllama prepare` and the training log print it). So is a
whole file that cannot be read: an I/O error, binary garbage, or a truncated or foreign Parquet file counts
as `unreadable_file` (a Parquet row group as `unreadable_row_group`), a garbage JSONL line as
`invalid_json`. A path that does not exist or matches no file is a config error, raised before any work
starts, and so is a Parquet file without the configured column.

Work is planned by file (`plan_units`): tokenizing at start-up, `maxllama prepare`'s workers and image sources
all read one file at a time.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from maxllama.config import ConfigError
from maxllama.config.schema import SourceConfig
from maxllama.data.corpus import stdlib_files
from maxllama.data.images import IMAGE_SKIP_REASONS
from maxllama.data.store import MANIFEST, PARTS, SPLITS

STDLIB = "stdlib"
IMAGE_FORMATS = ("image_caption", "interleaved")  # JSONL records with images: documents of tokens and tiles


class Document(NamedTuple):
    id: str  # stable across runs and machines: decides the train/validation split
    text: bytes | str


def is_remote(path: str) -> bool:
    return "://" in path


def source_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if path == STDLIB:
        return "text"
    # A folder with .parts/ but no manifest is an interrupted `prepare`: a store (which refuses to open), never
    # a folder of text files, or its parts would be trained on as documents.
    if (not is_remote(path) and any((Path(path) / name).exists() for name in (MANIFEST, PARTS))) or (
            is_remote(path) and _remote_exists(f"{path.rstrip('/')}/{MANIFEST}")):
        return "store"
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return {"jsonl": "jsonl", "json": "jsonl", "parquet": "parquet"}.get(suffix, "text")


def _remote_exists(path: str) -> bool:
    import fsspec
    fs, _, (stripped,) = fsspec.get_fs_token_paths(path)
    return fs.exists(stripped)


def resolve_files(source: SourceConfig, key: str) -> list[str]:
    """The files of a source, sorted; `key` names the config entry in errors (`data.sources[0].path`)."""
    path = source.path
    if path == STDLIB:
        return [str(p) for p in stdlib_files()]
    if is_remote(path):
        import fsspec
        fs, _, paths = fsspec.get_fs_token_paths(path)
        files = sorted(p for p in paths if fs.isfile(p)) or sorted(fs.find(path))
        files = [fs.unstrip_protocol(p) for p in files]
    elif any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
    elif Path(path).is_dir():
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
    elif Path(path).is_file():
        files = [path]
    else:
        raise ConfigError(f"{key}: {path} does not exist")
    if not files:
        raise ConfigError(f"{key}: {path} matches no file")
    return files


def document_root(files: list[str]) -> str:
    """The folder shared by all files, with its trailing '/': stripped from paths to form document ids, so
    ids (and the validation split) do not depend on where the data lives."""
    folders = [f.rsplit("/", 1)[0].split("/") for f in files]
    common = folders[0]
    for parts in folders[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return "/".join(common) + "/"


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        import fsspec
        with fsspec.open(path, "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def _is_empty(text: bytes | str) -> bool:
    return not text.strip()


def _usable(text, skipped: Counter) -> bool:
    """Whether a record's text field is a document; counts why not."""
    if not isinstance(text, str):
        skipped["missing_field"] += 1
        return False
    if _is_empty(text):
        skipped["empty_document"] += 1
        return False
    return True


def encodable(text: str, skipped: Counter) -> str:
    """JSON can escape lone surrogates ("\\ud800"), which no tokenizer encodes: replaced and counted. (Only
    escapes make them: raw surrogate bytes are invalid UTF-8, so such a line is invalid JSON.)"""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        skipped["repaired_lone_surrogates"] += 1
        return text.encode("utf-8", errors="replace").decode("utf-8")


def file_id(path: str, id_prefix: str) -> str:
    """A file's path below the sources' shared folder: where the data lives does not change document ids."""
    return path[len(id_prefix):] if id_prefix and path.startswith(id_prefix) else path


def read_counted(path: str, skipped: Counter) -> bytes | None:
    """A file's bytes, or None (counted as `unreadable_file`) when it cannot be read."""
    try:
        return read_bytes(path)
    except OSError:
        skipped["unreadable_file"] += 1
        return None


def json_records(data: bytes, skipped: Counter) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, line, parsed record) of every JSONL line that parses; garbage lines are counted."""
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL: not records
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            skipped["invalid_json"] += 1
            continue
        yield line_number, line, record


def iter_documents(path: str, fmt: str, field: str, skipped: Counter, id_prefix: str = "") -> Iterator[Document]:
    """Documents of one file; bad records are skipped and counted in `skipped` by reason."""
    doc_id = file_id(path, id_prefix)
    if fmt == "parquet":
        yield from _parquet_documents(path, field, skipped, doc_id)
        return
    data = read_counted(path, skipped)
    if data is None:
        return
    if fmt == "text":
        if _is_empty(data):
            skipped["empty_document"] += 1
        else:
            yield Document(doc_id, data)
        return
    for line_number, line, record in json_records(data, skipped):
        text = record.get(field) if isinstance(record, dict) else None
        if _usable(text, skipped):
            yield Document(f"{doc_id}:{line_number}", encodable(text, skipped) if b"\\u" in line else text)


def _parquet_documents(path: str, field: str, skipped: Counter, doc_id: str) -> Iterator[Document]:
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path if not is_remote(path) else _open_remote(path))
        columns = parquet.schema_arrow.names
    except Exception:  # pyarrow raises several types for truncated or foreign files
        skipped["unreadable_file"] += 1
        return
    if field not in columns:
        raise ConfigError(f"data.sources: {path} has no column '{field}' (columns: "
                          f"{', '.join(map(repr, columns))[:200]}); set the source's 'field'")
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            column = parquet.read_row_group(group, columns=[field]).column(0).to_pylist()
        except Exception:
            skipped["unreadable_row_group"] += 1
            continue
        for text in column:
            row += 1
            if _usable(text, skipped):
                yield Document(f"{doc_id}:{row}", text)


def _open_remote(path: str):
    import fsspec
    return fsspec.open(path, "rb").open()


def held_out(doc_id: str, val_fraction: float) -> bool:
    """Deterministic validation membership by a hash of the document id."""
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


class WorkUnit(NamedTuple):
    """One file of a source: the unit of tokenizing (at start-up or by `maxllama prepare`'s workers)."""

    index: int
    path: str
    format: str  # resolved: text, jsonl, parquet, or one of IMAGE_FORMATS
    field: str
    id_prefix: str  # stripped from the path in document ids (see document_root)
    key: str = "data.sources[0]"  # the source's config entry, for errors
    image_field: str = "image"
    content_field: str = "content"


def plan_units(sources: Sequence[SourceConfig], first_index: int = 0) -> list[WorkUnit]:
    """The files of raw sources, in order; every path is resolved first, so a missing one fails before any work.
    `first_index`: the config index of sources[0], for errors."""
    units = []
    for i, source in enumerate(sources, start=first_index):
        fmt = source_format(source.path, source.format)
        if fmt == "store":
            raise ConfigError(f"data.sources[{i}].path: {source.path} is already a token store; train on it with "
                              f"data.sources=[{{path: {source.path}}}]")
        files = resolve_files(source, f"data.sources[{i}].path")
        prefix = document_root(files)
        for path in files:
            units.append(WorkUnit(len(units), path, fmt, source.field, prefix, f"data.sources[{i}]",
                                  source.image_field, source.content_field))
    return units


def read_files(units: Sequence[WorkUnit], read: Callable[[WorkUnit], tuple[dict[str, list], Counter]]
               ) -> tuple[dict[str, list], Counter]:
    """Every unit's documents by split, in unit order, and their skip counts summed; `read(unit)` gives
    ({split: documents}, counts) of one file."""
    documents: dict[str, list] = {split: [] for split in SPLITS}
    skipped: Counter = Counter()
    for unit in units:
        docs, counts = read(unit)
        skipped.update(counts)
        for split in SPLITS:
            documents[split] += docs[split]
    return documents, skipped


def split_skipped(skipped: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(records, images): the counts of skipped records and of skipped images, by reason."""
    records = {k: v for k, v in sorted(skipped.items()) if k not in IMAGE_SKIP_REASONS}
    images = {k: v for k, v in sorted(skipped.items()) if k in IMAGE_SKIP_REASONS}
    return records, images


def describe_skipped(skipped: Mapping[str, int], *, images: bool = False) -> str:
    """`skipped records: invalid_json 2, ...`, and `; skipped images: ...` when `images` or any image was."""
    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in counts.items()) or "none"
    records, bad_images = split_skipped(skipped)
    text = f"skipped records: {listed(records)}"
    return f"{text}; skipped images: {listed(bad_images)}" if images or bad_images else text
