"""`maxllama checkpoint list` and `inspect`: what a run directory holds, from metadata alone."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    ckpt = commands.add_parser("checkpoint", help="list and inspect checkpoints",
                               description="List a run's checkpoints or inspect one, from metadata alone.")
    ckpt_commands = ckpt.add_subparsers(dest="checkpoint_command", required=True, metavar="SUBCOMMAND")
    ckpt_list = ckpt_commands.add_parser("list", help="steps, sizes and items of a run's checkpoints",
                                         description="Steps, sizes, items and save times of RUN_DIR/checkpoints; "
                                                     "interrupted saves are shown separately.")
    ckpt_list.add_argument("run_dir", metavar="RUN_DIR")
    ckpt_list.set_defaults(func=cmd_checkpoint_list)
    ckpt_inspect = ckpt_commands.add_parser(
        "inspect", help="config summary, data position and tree of shapes of one checkpoint",
        description="Inspect RUN_DIR (its newest checkpoint) or RUN_DIR/checkpoints/STEP.")
    ckpt_inspect.add_argument("checkpoint", metavar="CKPT")
    ckpt_inspect.set_defaults(func=cmd_checkpoint_inspect)


def cmd_checkpoint_list(ns: argparse.Namespace) -> int:
    from maxllama.checkpoint.inspect import list_checkpoints
    print(list_checkpoints(ns.run_dir))
    return 0


def cmd_checkpoint_inspect(ns: argparse.Namespace) -> int:
    from maxllama.checkpoint.inspect import inspect_checkpoint
    print(inspect_checkpoint(ns.checkpoint))
    return 0
