"""`maxllama train`."""

from __future__ import annotations

import argparse

from maxllama.cli.common import load_distributed


def register(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model from a YAML config",
        description="Train from a YAML config (default: experiments/tiny.yaml) with section.key=value overrides. "
                    "Re-running the same command resumes from the run directory's latest checkpoint.")
    train.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    train.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = load_distributed(ns.args)
    from maxllama.parallel.distributed import is_primary
    from maxllama.train.loop import train
    summary = train(cfg)
    if not is_primary():
        return 0
    ratio = summary.val_loss / summary.unigram_entropy
    print(f"final validation loss {summary.val_loss:.4f} nats/token = {ratio:.1%} of the unigram entropy "
          f"{summary.unigram_entropy:.4f} of the validation tokens")
    if summary.tokens_per_s == summary.tokens_per_s:  # not NaN: some steps ran
        print(f"throughput {summary.tokens_per_s:,.0f} tokens/s, MFU {summary.mfu:.1%}, step {summary.step_time_s * 1e3:.0f} ms, "
              f"compile {summary.compile_time_s:.1f} s, peak memory {summary.peak_memory_gb:.2f} GB")
    if summary.nonfinite_steps:
        print(f"non-finite updates skipped: {summary.nonfinite_steps} (train.nonfinite=skip); see the "
              f"'nonfinite' column of metrics.jsonl")
    print(f"metrics: {cfg.run_dir}/metrics.jsonl; curves: tensorboard --logdir {cfg.run_dir}/tensorboard")
    return 0
