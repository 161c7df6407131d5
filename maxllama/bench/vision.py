"""`make bench-vision`: throughput and MFU of a multimodal run, and the vision tower's share of its step time.

The share is measured, not only counted: the same config trains twice for the same steps and the same [batch,
seq_len] rows, once with its images (the encoder, adapter and projector run on every tile of the step's budget)
and once text-only on the captions alone; what the first step costs more is the tower's. The FLOPs share beside it
is flops.py's count.

    python -m maxllama.bench.vision [--config CONFIG] [--data DIR] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from maxllama.base.errors import UserError
from maxllama.config import load_config
from maxllama.train.flops import step_train_flops_per_token
from maxllama.train.loop import TrainSummary, train

BENCH = ["resume=never", "train.eval_every=100000", "train.log_every=10", "checkpoint.every_steps=100000",
         "logging.progress=false", "logging.tensorboard=false"]


def run(config: str, data: Path, overrides: list[str], steps: int) -> dict[str, tuple[TrainSummary, float]]:
    """{"with images" | "text only": (summary, FLOPs per token)}."""
    pairs, text = data / "captions.jsonl", data / "captions_text_only.jsonl"
    if not pairs.exists() or not text.exists():
        raise UserError(f"{data}: no captions.jsonl / captions_text_only.jsonl; write them with "
                        f"python -m maxllama.studies.digits --data-only --out {data}")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, extra in (("with images", f"{{path: {pairs}, format: image_caption}}", []),
                                    ("text only", f"{{path: {text}}}", ["vision.enabled=false"])):
            cfg, _ = load_config(config, [*BENCH, f"train.steps={steps}", f"data.sources=[{source}]",
                                          f"run.dir={tmp}/{name.replace(' ', '_')}", *extra, *overrides])
            out[name] = train(cfg, log=lambda *_: None), step_train_flops_per_token(cfg)
    return out


def table(results: dict[str, tuple[TrainSummary, float]]) -> str:
    (mm, mm_flops), (text, text_flops) = results["with images"], results["text only"]
    lines = [f"{'':12} {'tokens/s':>9} {'MFU':>6} {'step s':>7} {'compile s':>9} {'GFLOP/token':>11}"]
    for name, (s, flops) in results.items():
        lines.append(f"{name:12} {s.tokens_per_s:>9,.0f} {s.mfu:>6.1%} {s.step_time_s:>7.3f} {s.compile_time_s:>9.1f} "
                     f"{flops / 1e9:>11.5f}")
    lines.append(f"vision tower: {1 - text.step_time_s / mm.step_time_s:.1%} of the step time, "
                 f"{1 - text_flops / mm_flops:.1%} of the step's FLOPs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllama.bench.vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/multimodal/digits.yaml")
    parser.add_argument("--data", default="runs/multimodal", help="a folder the digits study wrote (default "
                        "runs/multimodal, from make multimodal)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run; the first interval is not timed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    try:
        print(table(run(ns.config, Path(ns.data), ns.overrides, ns.steps)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
