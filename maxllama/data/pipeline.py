"""The Grain pipeline: sources -> packed rows -> weighted mixture -> global batches -> this host's rows.

The global batch at step s is a pure function of (config, seed, s): rows are chosen by index (shuffled per
epoch by seed and epoch; mixed by weight), so `train[s]` is read directly, without the steps before it.
Each host reads only its contiguous share of the rows of every global batch, so resuming on a different
number of hosts yields the same global batches. Validation is a fixed set of rows spread evenly over each
source's held-out documents.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

import grain
import numpy as np

from maxllama.config import ConfigError
from maxllama.config.schema import Config, SourceConfig, VisionConfig
from maxllama.data.image_captions import load_image_source, require_vision
from maxllama.data.image_rows import ImageRows
from maxllama.data.image_store import ImageDocuments, open_image_documents
from maxllama.data.packing import Batch, ConcatWindows, EpochLayouts, FirstFitRows
from maxllama.data.prepare import tokenize_file
from maxllama.data.sources import IMAGE_FORMATS, describe_skipped, plan_units, read_files, source_format
from maxllama.data.store import SPLITS, TokenArrays, concatenate_documents, is_image_store, open_store
from maxllama.data.tokenizer import Tokenizer, make_tokenizer


@dataclasses.dataclass
class SourceData:
    name: str
    splits: dict[str, TokenArrays | ImageDocuments]
    weight: float
    skipped: Counter


@dataclasses.dataclass
class Datasets:
    tokenizer: Tokenizer
    train: grain.MapDataset  # infinite: train[step] is this host's share of the global batch of that step
    validation: list[Batch]
    sources: list[SourceData]
    skipped: Counter
    split_documents: int  # documents longer than a row, split into pieces (never truncated)

    @property
    def train_tokens(self) -> int:
        return sum(s.splits["train"].n_tokens for s in self.sources)

    @property
    def train_documents(self) -> int:
        return sum(s.splits["train"].n_docs for s in self.sources)

    @property
    def validation_documents(self) -> int:
        return sum(s.splits["validation"].n_docs for s in self.sources)

    def summary(self) -> str:
        """The `data:` line of the training log."""
        images = [s.splits["train"] for s in self.sources if isinstance(s.splits["train"], ImageDocuments)]
        tiles = (f", {sum(d.n_images for d in images)} images in {sum(d.n_tiles for d in images)} tiles"
                 if images else "")
        return (f"{self.train_documents} train documents ({self.train_tokens / 1e6:.1f}M tokens{tiles}) from "
                f"{len(self.sources)} source(s), {self.validation_documents} validation documents; "
                f"{describe_skipped(self.skipped, images=bool(images))}; long documents split: {self.split_documents}")


def load_source(index: int, source: SourceConfig, tokenizer: Tokenizer, cfg: Config) -> SourceData:
    """A store is opened (tokens and tiles stay on disk); raw sources are tokenized in memory, images decoded."""
    val_fraction = cfg.data.val_fraction
    if source.format in IMAGE_FORMATS:
        splits, skipped = load_image_source(index, source, tokenizer, cfg.vision, val_fraction)
        return SourceData(source.path, splits, source.weight, skipped)
    if source_format(source.path, source.format) == "store":
        return _open_prepared(index, source, tokenizer, cfg.vision)
    documents, skipped = read_files(plan_units([source], first_index=index),
                                    lambda unit: tokenize_file(unit, tokenizer, val_fraction))
    splits = {split: concatenate_documents(documents[split], tokenizer.bos_id, tokenizer.eos_id) for split in SPLITS}
    return SourceData(source.path, splits, source.weight, skipped)


def _open_prepared(index: int, source: SourceConfig, tokenizer: Tokenizer, vision: VisionConfig) -> SourceData:
    key = f"data.sources[{index}]"
    manifest, splits = open_store(source.path)
    stored = manifest["tokenizer"]["fingerprint"]
    if stored != tokenizer.fingerprint():
        raise ConfigError(f"{key}.path: {source.path} was tokenized with "
                          f"{manifest['tokenizer']['spec']} ({stored}), but data.tokenizer is "
                          f"{tokenizer.name} ({tokenizer.fingerprint()}); prepare it again or change data.tokenizer")
    if is_image_store(manifest):
        require_vision(f"{key}.path", f"{source.path}, a store of images,", vision)
        splits = open_image_documents(source.path, manifest, splits, vision, key)
    skipped = Counter(manifest.get("skipped", {})) + Counter(manifest.get("skipped_images", {}))
    return SourceData(source.path, splits, source.weight, skipped)


class _Rows:
    """An endless random-access sequence of (source, row) pairs: grain's source for first-fit rows, whose
    epochs have their own lengths and order."""

    def __init__(self, source_index: int):
        self.source_index = source_index

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, row: int) -> tuple[int, int]:
        return self.source_index, row


def _row_indices(packer, source_index: int, seed: int) -> grain.MapDataset:
    if isinstance(packer, EpochLayouts):  # shuffles and repeats itself
        return grain.MapDataset.source(_Rows(source_index))
    return (grain.MapDataset.range(len(packer)).shuffle(seed=seed % 2**32).repeat()
            .map(lambda row, s=source_index: (s, row)))


class BatchReader:
    """Reads the rows of a batch of (source, row) pairs that belong to one host."""

    def __init__(self, packers: list, host_rows: slice):
        self.packers, self.host_rows = packers, host_rows

    def __call__(self, pairs) -> Batch:
        sources, rows = (np.asarray(a)[self.host_rows] for a in pairs)
        parts = {}
        for s in np.unique(sources):
            parts[int(s)] = self.packers[int(s)].read(rows[sources == s])
        keys = next(iter(parts.values())).keys()
        out = {k: np.empty((len(rows),) + parts[int(sources[0])][k].shape[1:], parts[int(sources[0])][k].dtype)
               for k in keys}
        for s, part in parts.items():
            for k in keys:
                out[k][sources == s] = part[k]
        return out


class BlankImages:
    """A text packer's rows with an empty tile budget, when the model has a vision encoder: every batch has the
    same arrays, whatever its sources."""

    def __init__(self, packer, vision: VisionConfig):
        self.packer = packer
        self.shape = (vision.row_tiles, 3, vision.image_size, vision.image_size)
        self.split_documents = getattr(packer, "split_documents", 0)

    def __len__(self) -> int:
        return len(self.packer)

    def read(self, rows) -> Batch:
        out = self.packer.read(rows)
        return {**out, "pixels": np.zeros((len(rows), *self.shape), np.uint8),
                "patch_mask": np.zeros(out["inputs"].shape, bool)}


def make_packer(cfg: Config, tokens: TokenArrays | ImageDocuments, tokenizer: Tokenizer, seed: int, *,
                validation: bool = False):
    """How a source's documents become rows: by data.packing (validation: consecutive windows), images whole."""
    if isinstance(tokens, ImageDocuments):
        return ImageRows(tokens, cfg.train.seq_len, cfg.vision.row_tiles, cfg.vision, tokenizer, seed)
    if cfg.data.packing == "first_fit" and not validation:
        packer = FirstFitRows(tokens, cfg.train.seq_len, tokenizer.pad_id, seed)
    else:
        packer = ConcatWindows(tokens, cfg.train.seq_len, tokenizer.pad_id)
    return BlankImages(packer, cfg.vision) if cfg.vision.enabled else packer


def build_datasets(cfg: Config, *, process_index: int = 0, process_count: int = 1) -> Datasets:
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    b = cfg.train.batch_size
    if b % process_count:
        raise ConfigError(f"train.batch_size: {b} is not divisible by the {process_count} hosts")
    per_host = b // process_count
    host_rows = slice(process_index * per_host, (process_index + 1) * per_host)
    sources = [load_source(i, s, tokenizer, cfg) for i, s in enumerate(cfg.data.sources)]
    packers = []
    for i, source in enumerate(sources):
        packer = make_packer(cfg, source.splits["train"], tokenizer, cfg.seed + 7919 * i)
        if getattr(packer, "too_long", 0):
            source.skipped["too_long_image_document"] += packer.too_long
        if len(packer) == 0:
            raise ConfigError(f"data.sources[{i}].path: {source.name} has no training data "
                              f"(all documents skipped or held out)")
        packers.append(packer)
    indices = [_row_indices(p, i, cfg.seed + 7919 * i) for i, p in enumerate(packers)]
    mixed = indices[0] if len(indices) == 1 else grain.MapDataset.mix(indices, [s.weight for s in sources])
    train = mixed.batch(b, drop_remainder=True).map(BatchReader(packers, host_rows))

    validation = _validation_batches(cfg, sources, tokenizer, host_rows)
    skipped = sum((s.skipped for s in sources), Counter())
    split_docs = sum(getattr(p, "split_documents", 0) for p in packers)
    return Datasets(tokenizer, train, validation, sources, skipped, split_docs)


def _validation_batches(cfg: Config, sources, tokenizer: Tokenizer, host_rows: slice) -> list[Batch]:
    b = cfg.train.batch_size
    windows = [make_packer(cfg, s.splits["validation"], tokenizer, cfg.seed, validation=True) for s in sources]
    available = sum(len(w) for w in windows)
    n_rows = min(available // b, cfg.train.eval_batches) * b
    if n_rows == 0:
        raise ConfigError(f"data.val_fraction: the held-out documents give {available} sequences, fewer than one "
                          f"batch of {b}; raise data.val_fraction or lower train.batch_size")
    share = [round(n_rows * len(w) / available) for w in windows]
    share[-1] = n_rows - sum(share[:-1])
    rows: list[Batch] = []
    for w, n in zip(windows, share):
        if n:
            rows.append(w.read(np.linspace(0, len(w) - 1, n).round().astype(int)))
    stacked = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return [{k: v[i:i + b][host_rows] for k, v in stacked.items()} for i in range(0, n_rows, b)]


def iterate(dataset: grain.MapDataset, start: int, *, prefetch: int, workers: int):
    """Batches from `start` on, read ahead by threads, and by worker processes when `workers` > 0."""
    iterable = dataset[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(prefetch, 4)), prefetch_buffer_size=prefetch))
    if workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags; this process has none
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iterable


def batch_statistics(batch: Batch, image_start: int) -> dict[str, float]:
    """Host-side numbers for the metrics: documents started and padding in this batch, and with images (one
    `<|image_start|>`, this id, each) the images, tiles and image tokens."""
    real = batch["segment_ids"] > 0
    stats = {"documents": float(np.sum(real & (batch["positions"] == 0))),
             "padding_fraction": float(1.0 - real.mean())}
    if "pixels" in batch:
        mask = batch["patch_mask"]
        tiles = batch["pixels"].reshape(*batch["pixels"].shape[:2], -1).any(axis=-1)  # a tile left empty is all 0
        stats |= {"images": float(np.sum(batch["inputs"] == image_start)), "image_tiles": float(tiles.sum()),
                  "image_tokens_fraction": float(mask.mean())}
    return stats


def unigram_entropy(batches: list[Batch]) -> float:
    """Entropy (nats/token) of the target-token frequencies of these batches: the loss of the best
    context-free predictor, the bar a language model must clear."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    counts = np.bincount(targets)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
