"""`make bench-data`: token-store preparation speed (MB/s) and packed-batch throughput (tokens/s).

    python -m maxllama.bench.data [--seq-len 2048] [--batch-size 32] [--workers 2] [--batches 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from maxllama.config import load_config
from maxllama.config.schema import SourceConfig
from maxllama.data.pipeline import build_datasets, iterate
from maxllama.data.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--packing", default="concat", choices=["concat", "first_fit"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        manifest = prepare([SourceConfig(path="stdlib")], store, "byte", workers=args.workers, progress=False,
                           log=lambda *_: None)
        print(f"prepare: {manifest['prepare_mb_per_s']:.1f} MB/s with {args.workers} workers "
              f"({manifest['splits']['train']['tokens'] / 1e6:.1f}M tokens in {manifest['prepare_seconds']:.1f} s)")
        cfg, _ = load_config(None, [f"data.sources=[{{path: {store}}}]", f"train.seq_len={args.seq_len}",
                                    f"train.batch_size={args.batch_size}", f"data.packing={args.packing}",
                                    "model.attn_chunk=null", "train.eval_batches=1", "data.val_fraction=0.1"])
        data = build_datasets(cfg)
        iterator = iter(iterate(data.train, 0, prefetch=8, workers=args.workers))
        for _ in range(10):  # start the workers, fill the buffers
            next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        elapsed = time.perf_counter() - start
        tokens_per_s = args.batches * args.batch_size * args.seq_len / elapsed
        print(f"pipeline ({args.packing}, seq {args.seq_len}, batch {args.batch_size}, {args.workers} workers): "
              f"{tokens_per_s / 1e6:.2f}M tokens/s ({args.batches / elapsed:.1f} batches/s)")


if __name__ == "__main__":
    main()
