"""`maxllama prepare`: tokenize sources once into a TensorStore token store; image sources (image_caption,
interleaved) into an image store, their images decoded and tiled once (maxllama/data/image_store.py), so
training reads tiles instead of decoding them.

Work is split by file. Worker processes tokenize (and decode) files in parallel and write each file's result as
a part (atomically, under STORE/.parts/); an interrupted `prepare` re-run with the same arguments redoes only
the missing parts. Parts are then assembled in file order, so the store does not depend on worker timing, and
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
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from maxllama.config import ConfigError
from maxllama.config.schema import SourceConfig, VisionConfig
from maxllama.data.image_captions import image_records, read_image_file, require_vision
from maxllama.data.image_store import IMAGE_ARRAYS, ImageDocuments, tile_geometry
from maxllama.data.sources import IMAGE_FORMATS, WorkUnit, held_out, iter_documents, plan_units, split_skipped
from maxllama.data.store import (IMAGE_STORE, MANIFEST, PARTS, SPLITS, TOKEN_ARRAYS, TOKEN_STORE, checksum_key,
                                 concatenate_documents, create_array, read_manifest, row_layout, token_dtype)
from maxllama.data.tokenizer import Tokenizer, make_tokenizer


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
_worker_vision: VisionConfig | None = None


def _init_worker(tokenizer_spec: str, vision: VisionConfig | None) -> None:
    global _worker_tokenizer, _worker_vision
    _worker_tokenizer, _worker_vision = make_tokenizer(tokenizer_spec), vision


def _file_arrays(unit: WorkUnit, val_fraction: float) -> tuple[dict[str, np.ndarray], Counter]:
    """The store's arrays of one file, as `{split}_{name}`, and its skip counts."""
    tokenizer, vision = _worker_tokenizer, _worker_vision
    if unit.format in IMAGE_FORMATS:
        docs, counts = read_image_file(unit, tokenizer, vision, val_fraction)
        per_split = {split: ImageDocuments.from_documents(docs[split], vision.image_size).arrays() for split in SPLITS}
    else:
        docs, counts = tokenize_file(unit, tokenizer, val_fraction)
        per_split = {split: concatenate_documents(docs[split], tokenizer.bos_id, tokenizer.eos_id).arrays()
                     for split in SPLITS}
    return {f"{split}_{name}": array for split in SPLITS for name, array in per_split[split].items()}, counts


def _process(args: tuple[WorkUnit, str, float]) -> tuple[int, int]:
    unit, parts_dir, val_fraction = args
    arrays, counts = _file_arrays(unit, val_fraction)
    # Counts, shapes and dtypes in a small entry of their own: assembling sizes the store without loading tiles.
    meta = {"skipped": counts, "arrays": {key: [list(a.shape), a.dtype.name] for key, a in arrays.items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    final = Path(parts_dir) / f"{unit.index:08d}.npz"
    tmp = final.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, final)
    return unit.index, os.path.getsize(unit.path) if "://" not in unit.path else 0


def _holds_images(sources: Sequence[SourceConfig], vision: VisionConfig | None) -> bool:
    """Whether the sources make an image store. Image and text sources do not share one: prepare each kind
    apart and mix the stores by weight in training."""
    images = [i for i, source in enumerate(sources) if source.format in IMAGE_FORMATS]
    if images and len(images) < len(sources):
        raise ConfigError(f"data.sources[{images[0]}].format: {sources[images[0]].format} sources make a store of "
                          f"images, apart from text sources; prepare the two kinds into two stores")
    for i in images:
        require_vision(f"data.sources[{i}].format", sources[i].format, vision or VisionConfig())
    return bool(images)


def source_texts(sources: Sequence[SourceConfig]) -> Iterator[str]:
    """Every document of the sources as text (undecodable bytes replaced), every text part of image sources:
    what a tokenizer is trained on."""
    skipped: Counter = Counter()
    for unit in plan_units(sources):
        if unit.format in IMAGE_FORMATS:
            yield from (part.value for record in image_records(unit, skipped) for part in record.parts
                        if part.kind == "text")
            continue
        for doc in iter_documents(unit.path, unit.format, unit.field, skipped, unit.id_prefix):
            yield doc.text.decode("utf-8", errors="replace") if isinstance(doc.text, bytes) else doc.text


def prepare(sources: Sequence[SourceConfig], out_dir: str | Path, tokenizer_spec: str = "byte", *,
            val_fraction: float = 0.02, workers: int = 2, progress: bool = True, log=print,
            vision: VisionConfig | None = None) -> dict:
    """Tokenize `sources` into a token store at `out_dir` (image sources: an image store, tiled as `vision` says);
    returns its manifest. Idempotent and resumable."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        log(f"{out_dir} is already a complete token store; nothing to do")
        return read_manifest(str(out_dir))
    tokenizer = make_tokenizer(tokenizer_spec)
    units = plan_units(sources)  # resolves every path first: a missing source fails before any work
    vision = vision if _holds_images(sources, vision) else None
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
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_spec, vision)) as pool:
            for _, size in pool.imap_unordered(_process, jobs, chunksize=4):
                total_bytes += size
                bar.update(1)
    else:
        _init_worker(tokenizer_spec, vision)
        for job in jobs:
            total_bytes += _process(job)[1]
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    manifest = _assemble(out_dir, units, tokenizer, sources, val_fraction, vision)
    manifest["prepare_seconds"] = round(elapsed, 3)
    manifest["prepare_mb_per_s"] = round(total_bytes / 1e6 / elapsed, 3) if elapsed > 0 else None
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means complete
    shutil.rmtree(parts)
    return manifest


def _assemble(out_dir: Path, units: list[WorkUnit], tokenizer: Tokenizer, sources, val_fraction,
              vision: VisionConfig | None) -> dict:
    files = [out_dir / PARTS / f"{u.index:08d}.npz" for u in units]
    metas = []
    for f in files:
        with np.load(f) as part:
            metas.append(json.loads(part["meta"].tobytes()))
    records, images = split_skipped(sum((Counter(m["skipped"]) for m in metas), Counter()))
    dtype = token_dtype(tokenizer.vocab_size)
    counted = {**TOKEN_ARRAYS, **(IMAGE_ARRAYS if vision else {})}
    splits = {}
    for split in SPLITS:
        written = _write_split(out_dir, split, files, metas, counted, dtype)
        entry = {"tokens": written["tokens"][0], "documents": written["doc_starts"][0]}
        if vision:
            entry |= {"images": written["span_starts"][0], "tiles": written["tiles"][0]}
        splits[split] = entry | {checksum_key(name): digest for name, (_, digest) in written.items()}
    manifest = {
        "format": IMAGE_STORE if vision else TOKEN_STORE,
        "tokenizer": {"spec": tokenizer.name, "fingerprint": tokenizer.fingerprint(),
                      "vocab_size": tokenizer.vocab_size, "special": tokenizer.special},
        "token_dtype": dtype,
        "sources": [s.model_dump() for s in sources],
        "files": len(units),
        "val_fraction": val_fraction,
        "splits": splits,
        "skipped": records,
    }
    return manifest | ({"vision": tile_geometry(vision), "skipped_images": images} if vision else {})


def _write_split(out_dir: Path, split: str, files: list[Path], metas: list[dict], counted: dict[str, str | None],
                 tokens_dtype: str) -> dict[str, tuple[int, str]]:
    """Lays the parts' arrays of one split end to end in file order (so the store does not depend on which worker
    finished first), shifting the values that count rows of another array; {name: (rows, sha256)}."""
    handles, digests, at = {}, {}, {}
    for name in counted:
        described = [m["arrays"][f"{split}_{name}"] for m in metas]
        (shape, dtype), rows = described[0], sum(shape[0] for shape, _ in described)
        handles[name] = create_array(str(out_dir / split / name), (rows, *shape[1:]),
                                     tokens_dtype if name == "tokens" else dtype, **row_layout(tuple(shape[1:])))
        digests[name], at[name] = hashlib.sha256(), 0
    for f in files:
        with np.load(f) as part:
            chunks = {name: part[f"{split}_{name}"] for name in counted}
        before = dict(at)
        for name, chunk in chunks.items():
            if counted[name]:
                chunk = chunk + before[counted[name]]
            chunk = chunk.astype(handles[name].dtype.numpy_dtype)
            if len(chunk):
                handles[name][at[name]:at[name] + len(chunk)].write(chunk).result()
                digests[name].update(chunk.tobytes())
                at[name] += len(chunk)
    return {name: (at[name], digests[name].hexdigest()) for name in counted}
