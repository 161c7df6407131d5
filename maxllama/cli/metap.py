"""`maxllama metap show | coord-check | transfer | drift | regret`."""

from __future__ import annotations

import argparse
from pathlib import Path

from maxllama.base.errors import UserError
from maxllama.cli.common import int_list, load


def register(commands) -> None:
    metap = commands.add_parser("metap", help="MetaP: resolved per-group hyperparameters, coordinate check, transfer",
                                description="MetaP: per-parameter init scales, multipliers and learning rates that "
                                            "transfer from a tuned proxy to a larger run.")
    metap_commands = metap.add_subparsers(dest="metap_command", required=True, metavar="SUBCOMMAND")
    mshow = metap_commands.add_parser(
        "show", help="the resolved init std, LR, weight decay and Adam eps of every parameter group",
        description="Resolve the config's parametrization against its proxy (metap.base) and print every group's "
                    "init std, peak LR, weight decay and Adam eps, with the forward multipliers. Allocates nothing.")
    mshow.add_argument("file", metavar="CONFIG")
    mshow.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    mshow.add_argument("--parameters", action="store_true", help="also list the parameters of each group")
    mshow.set_defaults(func=cmd_metap_show)

    coord = metap_commands.add_parser(
        "coord-check", help="mean |activation| per module vs width, depth or vision width after a few high-LR steps",
        description="Train each width (or depth, or vision encoder width) a few steps at a high LR on one fixed "
                    "batch, for 2+ seeds; write a "
                    "PNG (one panel per step, log-log) and a JSON of the slopes per doubling; print a pass/fail "
                    "table, each slope with its standard error over seeds. Exit code 1 when MetaP fails.")
    coord.add_argument("file", metavar="CONFIG")
    coord.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    coord.add_argument("--widths", type=int_list, help="residual widths, e.g. 32,64,128,256,512")
    coord.add_argument("--depths", type=int_list, help="layer counts, e.g. 2,4,8,16,32")
    coord.add_argument("--vision-widths", type=int_list,
                       help="vision encoder widths, e.g. 32,64,128 (the config's data must have images)")
    coord.add_argument("--param", type=lambda s: s.split(","), default=["metap", "standard"],
                       help="parametrizations to check: metap, standard or both (default: metap,standard)")
    coord.add_argument("--seeds", type=int_list, default=[0, 1], help="seeds averaged (default 0,1)")
    coord.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    coord.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's optim.lr)")
    coord.add_argument("--tolerance", type=float, default=0.1, help="pass: |slope| per doubling at most this")
    coord.add_argument("--min-step", type=int, default=2, help="judge steps from this one on (default 2)")
    coord.add_argument("--out", help="output folder (default: RUN_DIR/coord_check)")
    coord.set_defaults(func=cmd_metap_coord_check)

    tr = metap_commands.add_parser(
        "transfer", help="fit a proxy sweep's optima and write the target's MetaP hyperparameters",
        description="Fit the optimum of every swept hyperparameter of a proxy sweep (parabola in log2 through the "
                    "best point and its neighbours, seeds averaged), the batch-size and horizon exponents kappa and beta when the "
                    "sweep varied them, and write metap.yaml; a target config applies it with metap.from: PATH.")
    tr.add_argument("sweep_dir", metavar="PROXY_SWEEP_DIR")
    tr.add_argument("--target", metavar="CONFIG", help="also resolve and record the target's per-group values")
    tr.add_argument("--out", default="metap.yaml", help="file to write (default metap.yaml)")
    tr.add_argument("--metric", default="final_val_loss", help="metric to minimise (default final_val_loss)")
    tr.add_argument("--check", metavar="SWEEP_DIR", help="a sweep at other batch sizes / horizons: compare its "
                                                          "measured optimal LR with the prediction")
    tr.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="use only the runs with this value of a swept key (e.g. model.d_model=32)")
    tr.set_defaults(func=cmd_metap_transfer)

    dr = metap_commands.add_parser(
        "drift", help="how far the optimal LR moves along a scaled key of a sweep (per parametrization)",
        description="For each value of KEY (e.g. model.d_model) fit the optimal LR, or another swept HPARAM "
                    "(parabola in log2, seeds averaged), and report the spread of its log2 optimum per "
                    "parametrization; writes drift.png and drift.json.")
    dr.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="one or more sweeps, pooled")
    dr.add_argument("--key", required=True, help="the scaled key, e.g. model.d_model, model.n_layers, model.n_experts")
    dr.add_argument("--split", default=None, help="one panel per value of this swept key (e.g. metap.parametrization)")
    dr.add_argument("--hparam", default="optim.lr",
                    help="the swept hyperparameter whose optimum is tracked (default optim.lr; e.g. metap.lr_readout)")
    dr.add_argument("--metric", default="final_val_loss")
    dr.set_defaults(func=cmd_metap_drift)

    rg = metap_commands.add_parser(
        "regret", help="end to end: a transferred target run against the best of a direct sweep at the target",
        description="Final loss of the target trained with transferred hyperparameters (a sweep over seeds) "
                    "against the best point of a direct LR sweep at the target; writes regret.png and regret.json.")
    rg.add_argument("transferred", metavar="TRANSFERRED_SWEEP_DIR")
    rg.add_argument("--direct", required=True, metavar="SWEEP_DIR", help="the direct LR sweep at the target")
    rg.add_argument("--proxy", nargs="*", default=[], metavar="SWEEP_DIR", help="proxy sweeps, for the cost ratio")
    rg.add_argument("--metric", default="final_val_loss")
    rg.set_defaults(func=cmd_metap_regret)


def cmd_metap_show(ns: argparse.Namespace) -> int:
    _, cfg, _ = load([ns.file, *ns.overrides])
    from maxllama.metap import table
    from maxllama.model.build import define_abstract
    info = table.summary(cfg, define_abstract(cfg))
    print(table.format_summary(info))
    if ns.parameters:
        for name, group in info["groups"].items():
            print(f"\n{name}:")
            for path in group["parameters"]:
                print(f"  {path}")
    if cfg.metap.parametrization == "standard":
        print("\nstandard parametrization; set metap.parametrization=metap (and metap.base.*) for the MetaP rules")
    return 0


def cmd_metap_coord_check(ns: argparse.Namespace) -> int:
    _, cfg, _ = load([ns.file, *ns.overrides])
    ladders = {axis: values for axis, values in
               (("width", ns.widths), ("depth", ns.depths), ("vision_width", ns.vision_widths)) if values}
    if len(ladders) != 1:
        raise UserError("give one of --widths W1,W2,..., --depths L1,L2,... or --vision-widths W1,W2,... "
                        "(one ladder per command)")
    from tqdm import tqdm

    from maxllama.studies import coord_check as cc
    [(axis, values)] = ladders.items()
    out_dir = Path(ns.out or Path(cfg.run_dir) / "coord_check")
    rungs = len(values) * len(ns.seeds)
    passed = {}
    for param in ns.param:
        with tqdm(total=rungs, desc=f"{param} {axis}s", unit="model") as bar:
            def progress(message: str) -> None:
                bar.set_postfix_str(message)
                bar.update(1)
            check = cc.coord_check(cfg, axis, values, param, seeds=ns.seeds, steps=ns.steps, lr=ns.lr,
                                   tolerance=ns.tolerance, min_step=ns.min_step, progress=progress)
        png, js = cc.write(check, out_dir)
        print(check.table())
        print(f"{'PASS' if check.passed else 'FAIL'}: {param}; plot {png}, slopes {js}\n")
        passed.setdefault(param, check.passed)
    return 1 if not passed.get("metap", True) else 0


def cmd_metap_transfer(ns: argparse.Namespace) -> int:
    from maxllama.config.loader import parse_scalar
    from maxllama.studies.transfer import check_report, resolve_target, transfer, write
    where = {}
    for item in ns.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--where {item}: expected KEY=VALUE")
        where[key] = parse_scalar(value)
    result = transfer(ns.sweep_dir, metric=ns.metric, where=where)
    out = Path(ns.out)
    for key, fit in result.fits.items():
        print(f"{key}: optimum {fit.optimum:.4g} ({ns.metric} {fit.loss:.4f}; {len(fit.points)} values, "
              f"{'parabola fit' if fit.fitted else 'best point'})")
    if result.kappa is not None:
        print(f"kappa (LR ~ batch^kappa): {result.kappa:.3f}")
    if result.beta is not None:
        print(f"beta (LR ~ tokens^-beta): {result.beta:.3f}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    target = resolve_target(result, ns.target) if ns.target else None
    write(result, out, Path(ns.sweep_dir), target)
    if target is not None:
        from maxllama.metap import table
        print(f"\ntarget {ns.target}:")
        print(table.format_summary(target.summary))
        print(f"proxy sweep cost: {target.proxy_cost(result, ns.sweep_dir):.3g} x the FLOPs of one target run")
    if ns.check:
        print(check_report(result, ns.check, out, ns.metric))
    print(f"\nwrote {out}; a target config uses it with   metap: {{from: {out}}}   "
          f"(or the override metap.from={out})")
    return 0


def cmd_metap_drift(ns: argparse.Namespace) -> int:
    from maxllama.studies.drift import report
    text, png, js = report(ns.sweep_dirs, ns.key, ns.split, ns.metric, ns.hparam)
    print(text)
    print(f"plot: {png}\ntable: {js}")
    return 0


def cmd_metap_regret(ns: argparse.Namespace) -> int:
    from maxllama.studies.regret import regret
    text, _ = regret(ns.transferred, ns.direct, ns.proxy, ns.metric)
    print(text)
    return 0
