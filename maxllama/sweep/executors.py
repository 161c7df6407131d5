"""Run a sweep's runs: locally (N at a time, each pinned to its share of the CPU cores) or as a SLURM job
array. The sweep directory holds one run directory per run and `sweep.json`, the manifest of every run's
status, exit code and error. Running a sweep again skips finished runs and resumes unfinished ones (each run
resumes from its own checkpoints). SIGTERM or SIGINT to a local sweep stops it the way a run stops: every running
run gets one SIGTERM, saves its step and exits; no further run starts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from maxllama.base.errors import UserError
from maxllama.base.signals import PREEMPTED_EXIT_CODE, preemption_signals
from maxllama.config import ConfigError, load_config
from maxllama.config.compat import config_changes, describe
from maxllama.config.schema import Config
from maxllama.sweep.spec import Run, Sweep

MANIFEST = "sweep.json"


def run_dir(sweep_dir: Path, run: Run) -> Path:
    return sweep_dir / "runs" / run.name


def run_overrides(sweep_dir: Path, run: Run) -> list[str]:
    return [*run.args(), f"run.dir={run_dir(sweep_dir, run)}", f"run.name={run.name}", "logging.progress=false"]


def train_command(sweep: Sweep, sweep_dir: Path, run: Run) -> list[str]:
    return [sys.executable, "-m", "maxllama", "train", str(sweep.base), *run_overrides(sweep_dir, run)]


def check_unchanged(directory: Path, cfg: Config) -> None:
    """A run directory trained from other settings (the sweep file or its base changed since) must be neither
    counted as this run nor resumed as it: its results would silently mix into the sweep's curves. `run.*` is
    where a run was written, not how it was trained (`config_changes` leaves it out): a sweep directory may be
    moved or renamed."""
    saved = directory / "config.yaml"
    if not saved.exists():
        return
    changed = config_changes(load_config(saved)[0].model_dump(), cfg.model_dump())
    if changed:
        shown = dict(list(changed.items())[:4])
        raise ConfigError(f"{saved.parent}: this run was trained with other settings than the sweep now gives it "
                          f"({describe(shown)}{'; ...' if len(changed) > 4 else ''}). Move the run directory "
                          f"away to re-run it, or run the sweep into a new --dir")


def finished(sweep: Sweep, sweep_dir: Path, run: Run) -> bool:
    cfg = load_config(sweep.base, run_overrides(sweep_dir, run))[0]
    check_unchanged(run_dir(sweep_dir, run), cfg)
    metrics = run_dir(sweep_dir, run) / "metrics.jsonl"
    if not metrics.exists():
        return False
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return bool(lines) and json.loads(lines[-1]).get("step") == cfg.train.steps


class Manifest:
    """sweep.json, rewritten atomically after every change (runs finish concurrently)."""

    def __init__(self, sweep: Sweep, sweep_dir: Path):
        self.path = sweep_dir / MANIFEST
        self.lock = threading.Lock()
        old = json.loads(self.path.read_text())["runs"] if self.path.exists() else {}
        self.data = {"sweep": str(sweep.path), "base": str(sweep.base), "swept": sweep.swept,
                     "runs": {r.name: {"overrides": r.overrides, "status": old.get(r.name, {}).get("status", "pending"),
                                       **{k: v for k, v in old.get(r.name, {}).items() if k in ("exit_code", "error")}}
                              for r in sweep.runs}}
        self.save()

    def update(self, name: str, **fields) -> None:
        with self.lock:
            self.data["runs"][name].update(fields)
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def _core_slots(parallel: int) -> list[set[int]]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // parallel)
    return [set(cores[(i * per) % len(cores):(i * per) % len(cores) + per]) for i in range(parallel)]


class Children:
    """The train processes a local sweep is running. Each runs in its own session, so a Ctrl-C at the terminal
    reaches the sweep alone, and the sweep passes it on as exactly one SIGTERM per run: a second signal would
    cut a run's final save short. A second signal to the sweep itself acts as if it had not intervened."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped_by: int | None = None

    def run(self, command: list[str], **popen) -> int:
        child = subprocess.Popen(command, start_new_session=True, **popen)
        with self.lock:
            self.running.add(child)
            if self.stopped_by is not None:  # the signal came while this run was starting
                child.terminate()
        try:
            return child.wait()
        finally:
            with self.lock:
                self.running.discard(child)

    def stop(self, signum: int) -> None:
        self.stopped_by = signum
        with self.lock:
            for child in self.running:
                child.terminate()


def resolve_executor(sweep: Sweep, executor_type: str | None = None, parallel: int | None = None) -> dict:
    """The sweep file's executor with the command line's choices over it."""
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel: must be at least 1, got {parallel}")
    executor = {**sweep.executor, **({"type": executor_type} if executor_type else {}),
                **({"parallel": parallel} if parallel else {})}
    if executor["type"] not in ("local", "slurm"):
        raise UserError(f"executor.type: unknown executor {executor['type']!r:.40} (local, slurm)")
    return executor


def run_local(sweep: Sweep, sweep_dir: Path, parallel: int = 1, progress: bool = True, log=print) -> dict:
    """Run every unfinished run, `parallel` at a time; returns the manifest, whose `stopped_by` names the
    signal that stopped the sweep early (None when it ran to the end)."""
    manifest = Manifest(sweep, sweep_dir)
    todo = []
    for run in sweep.runs:
        if finished(sweep, sweep_dir, run):
            manifest.update(run.name, status="done")
        else:
            todo.append(run)
    if len(todo) < len(sweep.runs):
        log(f"{len(sweep.runs) - len(todo)} of {len(sweep.runs)} runs already finished; running {len(todo)}")
    slots = _core_slots(parallel)
    free = list(range(parallel))
    free_lock = threading.Lock()
    bar = tqdm(total=len(sweep.runs), initial=len(sweep.runs) - len(todo), unit="run", disable=not progress)
    children = Children()

    def execute(run: Run) -> None:
        if children.stopped_by is not None:
            return
        with free_lock:
            slot = free.pop()
        cores = slots[slot]
        manifest.update(run.name, status="running")
        directory = run_dir(sweep_dir, run)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "train.log", "a") as out:
            preexec = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
            code = children.run(train_command(sweep, sweep_dir, run), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec)
        if code == 0:
            manifest.update(run.name, status="done", exit_code=0, error=None)
        elif children.stopped_by is not None and code in (PREEMPTED_EXIT_CODE, -signal.SIGTERM):
            # 75: it saved its step; -SIGTERM: it was still starting up, with nothing to save yet
            manifest.update(run.name, status="stopped", exit_code=code, error=None)
        else:
            tail = (directory / "train.log").read_text().strip().splitlines()[-5:]
            manifest.update(run.name, status="failed", exit_code=code, error="\n".join(tail))
            bar.write(f"run {run.name} failed (exit code {code}); see {directory / 'train.log'}")
        with free_lock:
            free.append(slot)
        bar.update(1)

    with preemption_signals(on_signal=children.stop), ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(execute, todo))
    bar.close()
    return manifest.data | {"stopped_by": children.stopped_by}


def _checkpoint_steps(directory: Path) -> list[int]:
    """Saved steps of a run directory, from the folder names alone (cheap: no Orbax)."""
    checkpoints = directory / "checkpoints"
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def plan_local(sweep: Sweep, sweep_dir: Path, parallel: int, log=print) -> None:
    """What `run_local` would do, run by run, without running or writing anything (`--dry-run`)."""
    log(f"dry run: {len(sweep.runs)} runs of {sweep.base} into {sweep_dir}, {parallel} at a time; nothing is run")
    for run in sweep.runs:
        steps = _checkpoint_steps(run_dir(sweep_dir, run))
        status = ("finished: skipped" if finished(sweep, sweep_dir, run)
                  else f"would resume from step {steps[-1]}" if steps else "would start")
        log(f"  {run.name}: {status}")
        log(f"    {shlex.join(train_command(sweep, sweep_dir, run))}")


def slurm_script(sweep: Sweep, sweep_dir: Path, executor: dict) -> str:
    n = len(sweep.runs)
    parallel = executor.get("parallel")
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=sweep-{sweep.path.stem}",
             f"#SBATCH --array=0-{n - 1}{f'%{parallel}' if parallel else ''}",
             f"#SBATCH --output={sweep_dir}/runs/slurm-%A_%a.out"]
    for key in ("partition", "time", "account", "qos"):
        if executor.get(key):
            lines.append(f"#SBATCH --{key}={executor[key]}")
    if executor.get("gpus_per_run"):
        lines.append(f"#SBATCH --gpus={executor['gpus_per_run']}")
    if executor.get("cpus_per_run"):
        lines.append(f"#SBATCH --cpus-per-task={executor['cpus_per_run']}")
    lines += ["set -euo pipefail", f"cd {Path.cwd()}",
              f"{sys.executable} -m maxllama sweep run-one {sweep.path} --dir {sweep_dir} --index \"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"


def run_slurm(sweep: Sweep, sweep_dir: Path, executor: dict, dry_run: bool, log=print) -> str:
    Manifest(sweep, sweep_dir)
    script = slurm_script(sweep, sweep_dir, executor)
    path = sweep_dir / "sweep.sbatch"
    path.write_text(script)
    if dry_run:
        log(script)
        return script
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch (SLURM) is not installed here; use --dry-run to see the job script, "
                                "or executor: local")
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    log(result.stdout.strip())
    return script


def write_status(sweep_dir: Path, run: Run, **fields) -> None:
    """Each run's own status file: array tasks on many nodes never write the same file."""
    path = run_dir(sweep_dir, run) / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, path)


def run_one(sweep: Sweep, sweep_dir: Path, index: int) -> int:
    """One run of the sweep (what each SLURM array task does); records its outcome in its status file."""
    run = sweep.runs[index]
    if finished(sweep, sweep_dir, run):
        write_status(sweep_dir, run, status="done", exit_code=0)
        return 0
    write_status(sweep_dir, run, status="running")
    code = subprocess.run(train_command(sweep, sweep_dir, run)).returncode
    write_status(sweep_dir, run, status="done" if code == 0 else "failed", exit_code=code)
    return code
