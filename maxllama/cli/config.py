"""`maxllama config show`."""

from __future__ import annotations

import argparse

from maxllama.cli.common import format_count, load


def register(commands) -> None:
    config = commands.add_parser("config", help="inspect configs", description="Inspect configs.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser(
        "show", help="print the resolved config and where each value came from",
        description="Print the resolved config (base: chain and overrides applied), the origin of every value "
                    "(file:line, override, default) and the parameter counts.")
    show.add_argument("file", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(ns: argparse.Namespace) -> int:
    _, cfg, origins = load([ns.file, *ns.overrides])
    from maxllama.config.render import render_with_origins
    from maxllama.model.build import define_abstract
    from maxllama.model.param_count import count_params
    from maxllama.parallel.rules import make_rules
    make_rules(cfg.mesh.rules)  # a config that names unknown axes is refused here as in `train`
    print(render_with_origins(cfg, origins))
    counts = count_params(cfg, define_abstract(cfg))
    vision = f" (text {format_count(counts.text_total)} + vision {format_count(counts.vision_total)})" \
        if counts.vision_total else ""
    print(f"# parameters: {format_count(counts.total)} total{vision}, {format_count(counts.active)} active per token")
    return 0
