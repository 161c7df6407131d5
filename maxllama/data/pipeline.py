"""Grain pipeline over packed windows: the global batch at step s is a pure function of (seed, s).

Training order: windows shuffled per epoch (seeded by seed and epoch), repeated forever, batched; the
batch at any step is read directly, so a run can start at any step without replaying the ones before.
Validation: a fixed set of windows spread evenly over the held-out files.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from maxllama.config import ConfigError
from maxllama.config.schema import Config
from maxllama.data.corpus import split_files, stdlib_files, stdlib_root
from maxllama.data.packing import PackedStream
from maxllama.data.tokenizer import ByteTokenizer, make_tokenizer

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Datasets:
    tokenizer: ByteTokenizer
    train: grain.MapDataset  # infinite: train[step] is the global batch of that step
    validation: list[Batch]
    train_tokens: int
    n_train_files: int
    n_validation_files: int


def _read_documents(files, tokenizer) -> list[np.ndarray]:
    return [tokenizer.encode(f.read_bytes()) for f in files]


def build_datasets(cfg: Config) -> Datasets:
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    root = stdlib_root()
    split = split_files(stdlib_files(root), root, cfg.data.val_fraction)
    t, b = cfg.train.seq_len, cfg.train.batch_size
    train_stream = PackedStream(_read_documents(split.train, tokenizer), tokenizer.bos_id, tokenizer.eos_id, t)
    val_stream = PackedStream(_read_documents(split.validation, tokenizer), tokenizer.bos_id, tokenizer.eos_id, t)
    if len(train_stream) < b:
        raise ConfigError(f"train.batch_size: the corpus has only {len(train_stream)} training sequences of "
                         f"{t} tokens, fewer than one batch of {b}")
    train = (grain.MapDataset.range(len(train_stream)).shuffle(seed=cfg.seed % 2**32).repeat()
             .map(train_stream.window).batch(b, drop_remainder=True))
    n_val = min(len(val_stream) // b, cfg.train.eval_batches) * b
    if n_val == 0:
        raise ConfigError(f"data.val_fraction: the held-out files give {len(val_stream)} sequences, "
                         f"fewer than one batch of {b}")
    picks = np.linspace(0, len(val_stream) - 1, n_val).round().astype(int)
    windows = [val_stream.window(int(i)) for i in picks]
    validation = [{k: np.stack([w[k] for w in windows[i:i + b]]) for k in windows[0]} for i in range(0, n_val, b)]
    return Datasets(tokenizer, train, validation, len(train_stream.tokens), len(split.train),
                    len(split.validation))


def unigram_entropy(batches: list[Batch]) -> float:
    """Entropy (nats/token) of the target-token frequencies of these batches: the loss of the best
    context-free predictor, the bar a language model must clear."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    counts = np.bincount(targets)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
