"""`maxllama prepare`: tokenize sources once into a TensorStore token store.

Work is split by file. Worker processes tokenize files in parallel and write each file's result as a part
(atomically, under STORE/.parts/); an interrupted `prepare` re-run with the same arguments redoes only the
missing parts. Parts are then assembled in file order, so the store does not depend on worker timing, and
the manifest is written last: a store with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from maxllama.config import ConfigError
from maxllama.config.schema import SourceConfig
from maxllama.data.sources import document_root, held_out, iter_documents, resolve_files, source_format
from maxllama.data.store import MANIFEST, PARTS, SPLITS, concatenate_documents, create_array, read_manifest, token_dtype
from maxllama.data.tokenizer import Tokenizer, make_tokenizer


class WorkUnit(NamedTuple):
    index: int
    path: str
    format: str
    field: str
    id_prefix: str


def tokenize_file(unit: WorkUnit, tokenizer: Tokenizer, val_fraction: float) -> tuple[dict[str, list], Counter]:
    """Documents of one file, tokenized and split; returns ({split: [token arrays]}, skipped/repaired counts)."""
    counts: Counter = Counter()
    docs: dict[str, list] = {split: [] for split in SPLITS}
    for doc in iter_documents(unit.path, unit.format, unit.field, counts, unit.id_prefix):
        text = doc.text
        if isinstance(text, bytes) and tokenizer.name != "byte":
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                text = text.decode("utf-8", errors="replace")
                counts["repaired_undecodable_bytes"] += 1
        ids = tokenizer.encode(text)
        docs["validation" if held_out(doc.id, val_fraction) else "train"].append(ids)
    return docs, counts


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = make_tokenizer(tokenizer_spec)


def _process(args: tuple[WorkUnit, str, float]) -> tuple[int, int]:
    unit, parts_dir, val_fraction = args
    tokenizer = _worker_tokenizer
    docs, counts = tokenize_file(unit, tokenizer, val_fraction)
    arrays = {}
    for split, items in docs.items():
        wrapped = concatenate_documents(items, tokenizer.bos_id, tokenizer.eos_id)
        arrays[f"{split}_tokens"] = wrapped.tokens_np
        arrays[f"{split}_starts"] = wrapped.doc_starts
    arrays["skipped"] = np.frombuffer(json.dumps(counts).encode(), np.uint8)
    final = Path(parts_dir) / f"{unit.index:08d}.npz"
    tmp = final.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, final)
    return unit.index, os.path.getsize(unit.path) if "://" not in unit.path else 0


def plan_units(sources: Sequence[SourceConfig]) -> list[WorkUnit]:
    units = []
    for i, source in enumerate(sources):
        if source.format == "image_caption":
            raise ConfigError(f"data.sources[{i}].format: image_caption sources are read directly by training; "
                              f"`prepare` stores text only")
        fmt = source_format(source.path, source.format)
        if fmt == "store":
            raise ConfigError(f"data.sources[{i}].path: {source.path} is already a token store; train on it with "
                              f"data.sources=[{{path: {source.path}}}]")
        files = resolve_files(source, f"data.sources[{i}].path")
        prefix = document_root(files)
        for path in files:
            units.append(WorkUnit(len(units), path, fmt, source.field, prefix))
    return units


def source_texts(sources: Sequence[SourceConfig]) -> Iterator[str]:
    """Every document of the sources as text (undecodable bytes replaced): what a tokenizer is trained on."""
    skipped: Counter = Counter()
    for unit in plan_units(sources):
        for doc in iter_documents(unit.path, unit.format, unit.field, skipped, unit.id_prefix):
            yield doc.text.decode("utf-8", errors="replace") if isinstance(doc.text, bytes) else doc.text


def prepare(sources: Sequence[SourceConfig], out_dir: str | Path, tokenizer_spec: str = "byte", *,
            val_fraction: float = 0.02, workers: int = 2, progress: bool = True, log=print) -> dict:
    """Tokenize `sources` into a token store at `out_dir`; returns its manifest. Idempotent and resumable."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        log(f"{out_dir} is already a complete token store; nothing to do")
        return read_manifest(str(out_dir))
    tokenizer = make_tokenizer(tokenizer_spec)
    units = plan_units(sources)  # resolves every path first: a missing source fails before any work
    parts = out_dir / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    done = {int(p.name.split(".")[0]) for p in parts.glob("*.npz") if not p.name.endswith(".tmp.npz")}
    pending = [u for u in units if u.index not in done]
    if done:
        log(f"resuming: {len(done)} of {len(units)} files already tokenized")
    start = time.perf_counter()
    total_bytes = 0
    bar = tqdm(total=len(units), initial=len(done), unit="file", disable=not progress, desc="tokenizing")
    jobs = [(u, str(parts), val_fraction) for u in pending]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_spec,)) as pool:
            for _, size in pool.imap_unordered(_process, jobs, chunksize=4):
                total_bytes += size
                bar.update(1)
    else:
        _init_worker(tokenizer_spec)
        for job in jobs:
            total_bytes += _process(job)[1]
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    manifest = _assemble(out_dir, units, tokenizer, sources, val_fraction)
    manifest["prepare_seconds"] = round(elapsed, 3)
    manifest["prepare_mb_per_s"] = round(total_bytes / 1e6 / elapsed, 3) if elapsed > 0 else None
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means complete
    shutil.rmtree(parts)
    return manifest


def _assemble(out_dir: Path, units: list[WorkUnit], tokenizer: Tokenizer, sources, val_fraction) -> dict:
    files = [out_dir / PARTS / f"{u.index:08d}.npz" for u in units]
    sizes = {split: 0 for split in SPLITS}
    n_docs = {split: 0 for split in SPLITS}
    skipped: Counter = Counter()
    for f in files:
        with np.load(f) as part:
            for split in SPLITS:
                sizes[split] += len(part[f"{split}_tokens"])
                n_docs[split] += len(part[f"{split}_starts"])
            skipped.update(json.loads(part["skipped"].tobytes()))
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        tokens = create_array(str(out_dir / split / "tokens"), sizes[split], dtype)
        all_starts = np.zeros(n_docs[split], np.int64)
        digest = hashlib.sha256()
        offset = doc = 0
        for f in files:  # in file order: the store does not depend on which worker finished first
            with np.load(f) as part:
                chunk, starts = part[f"{split}_tokens"].astype(dtype), part[f"{split}_starts"]
            if not len(starts):
                continue
            tokens[offset:offset + len(chunk)].write(chunk).result()
            digest.update(chunk.tobytes())
            all_starts[doc:doc + len(starts)] = offset + starts
            offset += len(chunk)
            doc += len(starts)
        starts_array = create_array(str(out_dir / split / "doc_starts"), n_docs[split], "int64")
        if n_docs[split]:
            starts_array[0:n_docs[split]].write(all_starts).result()
        splits[split] = {"tokens": sizes[split], "documents": n_docs[split], "sha256": digest.hexdigest(),
                         "starts_sha256": hashlib.sha256(all_starts.tobytes()).hexdigest()}
    return {
        "format": "maxllama-token-store-v1",
        "tokenizer": {"spec": tokenizer.name, "fingerprint": tokenizer.fingerprint(),
                      "vocab_size": tokenizer.vocab_size, "special": tokenizer.special},
        "token_dtype": dtype,
        "sources": [s.model_dump() for s in sources],
        "files": len(units),
        "val_fraction": val_fraction,
        "splits": splits,
        "skipped": dict(skipped),
    }
