"""`maxllama preflight`: will the step fit the mesh? Compiled from shapes, nothing allocated."""

from __future__ import annotations

import argparse
import sys

from maxllama.cli.common import EXIT_USER_ERROR, load_distributed


def register(commands) -> None:
    pre = commands.add_parser(
        "preflight", help="compile the train step for the configured mesh and report per-device memory and FLOPs",
        description="Compile the train step ahead of time from abstract shapes (nothing allocated) for the "
                    "configured mesh; report per-device parameters, optimizer state, temporaries and FLOPs; fail "
                    "when it exceeds mesh.device_memory_gb. Simulate a mesh on CPU with MAXLLAMA_CPU_DEVICES=N.")
    pre.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    pre.set_defaults(func=cmd_preflight)


def cmd_preflight(ns: argparse.Namespace) -> int:
    cfg = load_distributed(ns.args)
    from maxllama.train.preflight import DoesNotFit, preflight
    try:
        result = preflight(cfg)
    except DoesNotFit as e:
        print(f"maxllama: does not fit: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(result.report())
    return 0
