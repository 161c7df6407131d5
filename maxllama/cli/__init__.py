"""`maxllama <command>`: the command line. `python -m maxllama` is the same.

One module per command group declares its arguments beside its handlers; handlers parse, call the library and
print. User errors (bad config, missing file, impossible mesh) print one line naming the key or file and exit
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from maxllama.base.errors import UserError
from maxllama.base.signals import TrainingStopped
from maxllama.cli import checkpoint, config, data, metap, model, preflight, sweep, train
from maxllama.cli.common import EXIT_USER_ERROR

USER_ERRORS = (UserError, FileNotFoundError)
GROUPS = (train, config, model, data, preflight, sweep, metap, checkpoint)  # the order `--help` lists them in


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxllama", description="Pretrain Llama-4-style models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except USER_ERRORS as e:
        message = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
        print(f"maxllama: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maxllama: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except TrainingStopped as e:
        print(f"maxllama: {e.kind}: {e}", file=sys.stderr)
        return e.exit_code
