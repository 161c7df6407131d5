"""`maxllama sweep plan | run | run-one | report`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    sweep = commands.add_parser("sweep", help="plan, run and report sweeps of training runs",
                                description="Sweeps of training runs from a sweep YAML (grid, zip, random, seeds).")
    sweep_commands = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    plan = sweep_commands.add_parser("plan", help="list the runs a sweep file expands to, without running",
                                     description="List the runs (name and swept values) after validating each config.")
    plan.add_argument("file", metavar="SWEEP.yaml")
    plan.set_defaults(func=cmd_sweep_plan)
    run = sweep_commands.add_parser("run", help="run (or resume) a sweep",
                                    description="Run every unfinished run of the sweep; finished runs are skipped, "
                                                "unfinished ones resume from their checkpoints. --dry-run shows "
                                                "which, and each run's command, without running anything.")
    run.add_argument("file", metavar="SWEEP.yaml")
    run.add_argument("--dir", help="sweep directory (default runs/sweeps/<sweep file name>)")
    run.add_argument("--executor", choices=["local", "slurm"], help="override the sweep file's executor")
    run.add_argument("--parallel", type=int, help="concurrent runs (local) or array-task limit (slurm)")
    run.add_argument("--dry-run", action="store_true",
                     help="run nothing: list every run (finished, would resume, or would start) with its train "
                          "command; slurm: print the job script (written to DIR/sweep.sbatch) instead of submitting")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_sweep_run)
    one = sweep_commands.add_parser("run-one", help="run one run of a sweep (what each SLURM array task does)",
                                    description="Run the run at --index of the sweep file into --dir.")
    one.add_argument("file", metavar="SWEEP.yaml")
    one.add_argument("--dir", help="sweep directory")
    one.add_argument("--index", type=int, required=True)
    one.set_defaults(func=cmd_sweep_run_one)
    rep = sweep_commands.add_parser("report", help="table, CSV and plot of a sweep's results",
                                    description="Write DIR/report.csv, print the table, and plot METRIC against a "
                                                "swept key (default: the learning rate), one curve per value of another, "
                                                "with each curve's fitted optimum marked.")
    rep.add_argument("dir", metavar="DIR")
    rep.add_argument("--x", help="swept key on the x axis (log2)")
    rep.add_argument("--curve", help="swept key whose values make the curves")
    rep.add_argument("--metric", default="final_val_loss", choices=["final_val_loss", "best_val_loss", "final_loss"])
    rep.set_defaults(func=cmd_sweep_report)


def _sweep_dir(ns: argparse.Namespace, sweep) -> Path:
    return Path(ns.dir) if ns.dir else Path("runs/sweeps") / sweep.path.stem


def _same_command(ns: argparse.Namespace) -> str:
    return f"maxllama sweep run {ns.file}{f' --dir {ns.dir}' if ns.dir else ''}"


def cmd_sweep_plan(ns: argparse.Namespace) -> int:
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)
    print(f"{len(sweep.runs)} runs of {sweep.base}; swept: {', '.join(sweep.swept) or 'nothing'}")
    for run in sweep.runs:
        print(f"  {run.name:<40} " + " ".join(f"{k}={run.overrides[k]}" for k in sweep.swept if k in run.overrides))
    return 0


def cmd_sweep_run(ns: argparse.Namespace) -> int:
    import signal

    from maxllama.base.signals import PREEMPTED_EXIT_CODE
    from maxllama.sweep.executors import plan_local, resolve_executor, run_local, run_slurm
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)  # validates every run's config before anything starts
    sweep_dir = _sweep_dir(ns, sweep)
    executor = resolve_executor(sweep, ns.executor, ns.parallel)
    if executor["type"] == "slurm":
        run_slurm(sweep, sweep_dir, executor, ns.dry_run)
        return 0
    if ns.dry_run:
        plan_local(sweep, sweep_dir, executor["parallel"])
        print(f"next: {_same_command(ns)} (without --dry-run)")
        return 0
    manifest = run_local(sweep, sweep_dir, executor["parallel"], progress=not ns.quiet)
    if manifest["stopped_by"] is not None:
        stopped = [name for name, run in manifest["runs"].items() if run["status"] == "stopped"]
        print(f"sweep stopped by {signal.Signals(manifest['stopped_by']).name}: {len(stopped)} running runs saved "
              f"their step and stopped; no further run started. Resume with: {_same_command(ns)}")
        return PREEMPTED_EXIT_CODE
    failed = [name for name, run in manifest["runs"].items() if run["status"] == "failed"]
    print(f"{len(manifest['runs']) - len(failed)} of {len(manifest['runs'])} runs finished; "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    print(f"next: maxllama sweep report {sweep_dir}")
    return 1 if failed else 0


def cmd_sweep_run_one(ns: argparse.Namespace) -> int:
    from maxllama.sweep.executors import run_one
    from maxllama.sweep.spec import load_sweep
    sweep = load_sweep(ns.file)
    return run_one(sweep, _sweep_dir(ns, sweep), ns.index)


def cmd_sweep_report(ns: argparse.Namespace) -> int:
    from maxllama.sweep.report import report
    text, csv_path, png, optima = report(ns.dir, ns.x, ns.curve, ns.metric)
    print(text)
    print(f"table: {csv_path}")
    if png:
        print(f"plot: {png}")
        for curve, optimum in optima.items():
            note = "" if optimum.fitted else " (best point; too few points to fit)"
            edge = "; at the edge of the swept range: widen it" if optimum.at_edge else ""
            print(f"  optimum for {curve}: {optimum.x:.4g} ({ns.metric} {optimum.value:.4f}){note}{edge}")
    return 0
