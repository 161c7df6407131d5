"""`maxllama prepare`: sources -> a token store, or a trained tokenizer."""

from __future__ import annotations

import argparse

from maxllama.base.errors import UserError
from maxllama.cli.common import load


def register(commands) -> None:
    prep = commands.add_parser(
        "prepare", help="tokenize sources into a token store (or train a tokenizer)",
        description="Tokenize text files, folders, globs, JSONL or Parquet (local or gs://, s3://) once into a "
                    "TensorStore token store with a manifest; parallel, resumable (re-run the same command). "
                    "Image sources (format image_caption or interleaved) come from --config, whose vision section "
                    "decides the tiles: their images are decoded once and stored as tiles beside the tokens. "
                    "With --train-tokenizer N, train an N-token BPE tokenizer on the sources instead.")
    prep.add_argument("sources", nargs="*", metavar="SOURCE")
    prep.add_argument("--out", required=True, help="store directory (or tokenizer.json with --train-tokenizer)")
    prep.add_argument("--config", help="take sources, tokenizer and val_fraction from this config's data section "
                                       "(and the tile geometry of image sources from its vision section)")
    prep.add_argument("--tokenizer", default="byte", help="'byte', tokenizer.json or SentencePiece .model")
    prep.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    prep.add_argument("--field", default="text", help="JSONL field / Parquet column with the text")
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    prep.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)


def _sources(ns: argparse.Namespace):
    """(sources, tokenizer, val_fraction, vision): from --config's data and vision sections, or from the SOURCE
    arguments."""
    from maxllama.config.schema import SourceConfig, VisionConfig
    if ns.config:
        _, cfg, _ = load([ns.config])
        return cfg.data.sources, cfg.data.tokenizer, cfg.data.val_fraction, cfg.vision
    if not ns.sources:
        raise UserError("prepare: name at least one SOURCE, or --config CONFIG to use its data.sources")
    sources = [SourceConfig(path=p, format=ns.format, field=ns.field) for p in ns.sources]
    return sources, ns.tokenizer, ns.val_fraction, VisionConfig()


def cmd_prepare(ns: argparse.Namespace) -> int:
    sources, tokenizer, val_fraction, vision = _sources(ns)
    if ns.train_tokenizer:
        from maxllama.data.prepare import source_texts
        from maxllama.data.tokenizer import train_bpe
        trained = train_bpe(source_texts(sources), ns.train_tokenizer, ns.out)
        print(f"trained a {trained.vocab_size}-token BPE tokenizer: {ns.out}")
        print(f"next: maxllama prepare ... --tokenizer {ns.out} --out STORE_DIR")
        return 0
    from maxllama.data.prepare import prepare
    from maxllama.data.sources import describe_skipped
    from maxllama.data.store import is_image_store
    manifest = prepare(sources, ns.out, tokenizer, val_fraction=val_fraction, workers=ns.workers,
                       progress=not ns.quiet, vision=vision)
    images = is_image_store(manifest)
    for split, numbers in manifest["splits"].items():
        tiles = f", {numbers['images']:,} images in {numbers['tiles']:,} tiles" if images else ""
        print(f"{split}: {numbers['documents']:,} documents, {numbers['tokens']:,} tokens{tiles}")
    skipped = describe_skipped({**manifest["skipped"], **manifest.get("skipped_images", {})}, images=images)
    print(f"{skipped}; {manifest.get('prepare_mb_per_s')} MB/s")
    print(f"next: train on it with data.sources=[{{path: {ns.out}}}] (and data.tokenizer={tokenizer})")
    return 0
