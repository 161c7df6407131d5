"""`maxllama <command>`: the command line. `python -m maxllama` is the same.

User errors (bad config, missing file, impossible mesh) print one line naming the key or file and exit
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml

DEFAULT_CONFIG = "experiments/tiny.yaml"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix from the message alone."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from maxllama.checkpoint.manager import ResumeError
    from maxllama.config import ConfigError
    from maxllama.parallel.mesh import MeshError
    return UserError, ConfigError, MeshError, ResumeError, FileNotFoundError


def _split_config_and_overrides(args: Sequence[str], default: str | None) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return default, list(args)


def _load(args: Sequence[str], default: str | None):
    from maxllama.config import load_config
    path, overrides = _split_config_and_overrides(args, default)
    if path is not None and not Path(path).exists():
        raise UserError(f"config file not found: {path}")
    cfg, origins = load_config(path, overrides)
    return path, cfg, origins


def cmd_train(ns: argparse.Namespace) -> int:
    _, cfg, _ = _load(ns.args, DEFAULT_CONFIG)
    from maxllama.train.loop import train
    summary = train(cfg)
    ratio = summary.val_loss / summary.unigram_entropy
    print(f"final validation loss {summary.val_loss:.4f} nats/token = {ratio:.1%} of the byte unigram entropy "
          f"{summary.unigram_entropy:.4f} of the same validation data")
    if summary.tokens_per_s == summary.tokens_per_s:  # not NaN: some steps ran
        print(f"throughput {summary.tokens_per_s:,.0f} tokens/s, MFU {summary.mfu:.1%}, step {summary.step_time_s * 1e3:.0f} ms, "
              f"compile {summary.compile_time_s:.1f} s, peak memory {summary.peak_memory_gb:.2f} GB")
    print(f"metrics: {cfg.run_dir}/metrics.jsonl; curves: tensorboard --logdir {cfg.run_dir}/tensorboard")
    return 0


def _format_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_config(cfg, origins) -> str:
    """The resolved config as YAML, each leaf annotated with where its value came from."""
    from maxllama.config.loader import resolved_origins
    where = resolved_origins(cfg, origins)
    lines: list[str] = []

    def emit(tree: dict, prefix: str, indent: int) -> None:
        for key, value in tree.items():
            dotted = prefix + key
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                emit(value, dotted + ".", indent + 1)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                entry = f"{pad}{key}: {text}"
                lines.append(f"{entry:<48} # {where.get(dotted, 'default')}")

    emit(cfg.model_dump(), "", 0)
    return "\n".join(lines)


def cmd_config_show(ns: argparse.Namespace) -> int:
    path, cfg, origins = _load([ns.file, *ns.overrides], None)
    print(render_config(cfg, origins))
    from maxllama.model.build import define_model
    from maxllama.model.param_count import count_params
    from maxllama.parallel.mesh import build_mesh
    from maxllama.parallel.rules import LogicalSharding
    import jax
    # Counting needs shapes only: a one-device mesh, whatever the config's mesh says.
    mesh = build_mesh(cfg.mesh.model_copy(update={"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}), jax.devices()[:1])
    counts = count_params(cfg, define_model(cfg, LogicalSharding(mesh)))
    vision = f" (text {_format_count(counts.text_total)} + vision {_format_count(counts.vision_total)})" \
        if counts.vision_total else ""
    print(f"# parameters: {_format_count(counts.total)} total{vision}, {_format_count(counts.active)} active per token")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxllama", description="Pretrain Llama-4-style models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model from a YAML config",
        description="Train from a YAML config (default: experiments/tiny.yaml) with section.key=value overrides. "
                    "Re-running the same command resumes from the run directory's latest checkpoint.")
    train.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    train.set_defaults(func=cmd_train)

    config = commands.add_parser("config", help="inspect configs", description="Inspect configs.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser(
        "show", help="print the resolved config and where each value came from",
        description="Print the resolved config (base: chain and overrides applied), the origin of every value "
                    "(file:line, override, default) and the parameter counts.")
    show.add_argument("file", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except _user_errors() as e:
        message = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
        print(f"maxllama: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maxllama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
