"""Orbax checkpoints of the train state, the save policy, and the resume policy (`resume: auto|never|require`).

A checkpoint is one Orbax step, written atomically (into a temporary folder renamed when complete), with
items `params`, `opt_state` and `meta` (resolved config, tokenizer fingerprint, MetaP table, seed), so a model
can be restored without its optimizer (sampling, scoring, export, `init_from:`); an imported model has
`params` alone. Saves are asynchronous: the loop waits only while arrays are copied off the device.
Restoring tries the newest checkpoint first and falls back, with one warning line, past any that cannot be
read (a missing or damaged file in any item); a checkpoint whose arrays have other shapes than the model is
not damaged but another model's, and stops the restore instead (`IncompatibleCheckpoint`). A save that fails
(disk full, permission, I/O error) raises `SaveFailed`; its partial write stays in Orbax's temporary folder,
which no restore reads.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from maxllama.base.errors import UserError
from maxllama.base.signals import SaveFailed
from maxllama.base.state import TrainState
from maxllama.base.tree import param_path
from maxllama.config.schema import CheckpointConfig
from maxllama.parallel.distributed import agree, is_primary

ITEMS = ("params", "opt_state", "meta")  # what a training checkpoint holds
UNREADABLE = "unreadable"  # suffix of a checkpoint folder set aside because it could not be restored


class ResumeError(UserError, RuntimeError):
    """The run directory cannot be resumed as asked (the policy, an incompatible config, no restorable
    checkpoint); the message says what to do."""


class IncompatibleCheckpoint(ResumeError):
    """The checkpoint's arrays do not fit the model: it belongs to another configuration."""


def _reason(e: BaseException) -> str:
    """One short line for an exception from Orbax/TensorStore, whose messages run to kilobytes of specs."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _closed_loop_noise(exc_type, exc) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _quiet_orbax() -> None:
    """Orbax reports every failure twice: its threads log it with a traceback (absl), and unfinished reads and
    writes of a failed save or restore fail again in the background (asyncio's "exception was never
    retrieved", TensorStore callbacks that wake a closed event loop). It also raises it where the save or
    restore is awaited, and there the Checkpointer says it once, in one line; the rest is muted."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if getattr(sys.excepthook, "drops_closed_loop_noise", False):
        return
    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(exc_type, exc, tb):
        if not _closed_loop_noise(exc_type, exc):
            previous_hook(exc_type, exc, tb)

    def unraisablehook(info):
        if not _closed_loop_noise(info.exc_type, info.exc_value):
            previous_unraisable(info)

    excepthook.drops_closed_loop_noise = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _shapes(tree: Any) -> dict[str, tuple]:
    return {param_path(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatches(stored: Any, target: Any) -> list[str]:
    """How the stored arrays' tree differs from the target's: missing, extra or reshaped arrays."""
    have, want = _shapes(stored), _shapes(target)
    problems = [f"{key} missing" for key in want if key not in have]
    problems += [f"{key} not in the model" for key in have if key not in want]
    problems += [f"{key} {have[key]} vs {want[key]}" for key in want if key in have and have[key] != want[key]]
    return problems


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings of `tree`'s arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: Path, policy: CheckpointConfig | None = None, *, read_only: bool = False):
        self.policy = policy or CheckpointConfig()
        _quiet_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.policy.keep, keep_period=self.policy.keep_every or None, create=not read_only,
            read_only=read_only, enable_async_checkpointing=self.policy.async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self._last_save_time = time.monotonic()
        self._failed = False  # a save failed: it was reported once, closing must not report it again

    @property
    def directory(self) -> Path:
        return Path(self.manager.directory)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Every `every_steps` steps, or when `every_minutes` passed since the last save."""
        p = self.policy
        by_steps = p.every_steps > 0 and step % p.every_steps == 0
        by_time = p.every_minutes > 0 and time.monotonic() - self._last_save_time >= 60 * p.every_minutes
        return (by_steps or by_time) and step not in self.manager.all_steps()

    def save(self, step: int, state: TrainState, *, meta: dict | None = None, wait: bool = False) -> bool:
        """Save `state` as checkpoint `step` (passed in, not read from `state`, so nothing waits for the
        device). Returns once arrays are off the device unless `wait`."""
        if step in self.manager.all_steps():
            return False
        items = {"params": ocp.args.StandardSave(state.params), "opt_state": ocp.args.StandardSave(state.opt_state)}
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        with self._saving(step):  # also reports a failure of the previous, asynchronous save
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            if wait:
                self.manager.wait_until_finished()
        self._last_save_time = time.monotonic()
        return saved

    def save_params(self, step: int, params: dict) -> None:
        with self._saving(step):
            self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _saving(self, step: int | None):
        try:
            yield
        except Exception as e:
            self._failed = True
            detail, failed_step = _save_failure(e)
            step = failed_step if failed_step is not None else step
            what = f"checkpoint {step}" if step is not None else "a checkpoint"
            kept = [s for s in self.steps() if s != step]
            earlier = f"earlier checkpoints are intact (newest: step {kept[-1]})" if kept else "no earlier checkpoint"
            raise SaveFailed(f"cannot save {what} in {self.directory}: {detail}; {earlier}. Fix the cause "
                             f"(free space, permissions) and re-run the same command to resume") from None

    def stored_tree(self, step: int, item: str) -> Any:
        """The shapes and dtypes of a saved item's arrays, from its metadata (no array read)."""
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / item)

    def check_shapes(self, step: int, target: TrainState) -> None:
        """Raise IncompatibleCheckpoint when the checkpoint's arrays are not the target's."""
        for item in ("params", "opt_state"):
            problems = shape_mismatches(self.stored_tree(step, item), getattr(target, item))
            if problems:
                raise IncompatibleCheckpoint(
                    f"{self.directory}/{step}: its {item} do not fit this model ({len(problems)} arrays differ: "
                    f"{'; '.join(problems[:3])}); it was saved by another configuration")

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore into the structure, dtypes and shardings of `target` (abstract or concrete): a checkpoint
        saved on one mesh restores onto another."""
        self.check_shapes(step, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target.params)),
            opt_state=ocp.args.StandardRestore(abstract_tree(target.opt_state))))
        step_array = jnp.asarray(step, jnp.int32)
        if hasattr(target.step, "sharding"):
            step_array = jax.device_put(step_array, target.step.sharding)
        return TrainState(step_array, restored.params, restored.opt_state)

    def restore_newest(self, target: TrainState, log: Callable[[str], None],
                       check: Callable[[dict], None] = lambda meta: None) -> tuple[TrainState, dict] | None:
        """(state, meta) of the newest checkpoint that restores, warning in one line about each damaged one
        skipped; None if none does. `check(meta)` runs before any array is read and may refuse the run (its
        exception, like IncompatibleCheckpoint, ends the search: the checkpoint is fine, the config is not)."""
        steps, unreadable = self.steps(), []
        for i in reversed(range(len(steps))):
            step = steps[i]
            then = f"trying step {steps[i - 1]}" if i else "no earlier checkpoint"
            try:
                meta = self.meta(step)
                if meta is None:
                    raise FileNotFoundError(f"{self.directory}/{step}/meta is missing")
            except Exception as e:  # Orbax/TensorStore raise many types for truncated or missing files
                log(f"warning: checkpoint {self.directory}/{step} cannot be read ({_reason(e)}); {then}")
                unreadable.append(step)
                continue
            check(meta)
            try:
                state = self.restore(step, target)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:
                log(f"warning: checkpoint {self.directory}/{step} cannot be restored ({_reason(e)}); {then}")
                unreadable.append(step)
                continue
            self._set_aside(unreadable, log)
            return state, meta
        return None

    def _set_aside(self, steps: list[int], log: Callable[[str], None]) -> None:
        """Rename unreadable checkpoints newer than the one resumed from to `STEP.unreadable`: the run saves
        those steps again, and their bytes stay for a person to look at (no restore reads them)."""
        if not steps:
            return
        if is_primary():
            for step in steps:
                path = self.directory / str(step)
                aside = path.with_name(f"{step}.{UNREADABLE}")
                for n in itertools.count(2):  # set aside before, and damaged again
                    if not aside.exists():
                        break
                    aside = path.with_name(f"{step}.{UNREADABLE}-{n}")
                path.rename(aside)
                log(f"set the unreadable checkpoint aside as {aside}; step {step} will be saved again")
        agree(True)  # every process sees the renames before it saves
        self.manager.reload()

    def problem(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be read, from its metadata alone (None: it looks whole). Damage inside
        the array files is found only by reading them (`restore`)."""
        items = [item for item in ITEMS if (self.directory / str(step) / item).exists()]
        if "params" not in items:
            return "no params"
        try:
            for item in items:
                if item == "meta":
                    self.meta(step)
                else:
                    self.stored_tree(step, item)
        except Exception as e:
            return f"{item}: {_reason(e)}"
        return None

    def restore_params(self, step: int, target: Any) -> dict:
        """Parameters alone, cast to the target's dtypes and laid out with its shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target))))
        return restored.params

    def meta(self, step: int) -> dict | None:
        """The JSON metadata saved with checkpoint `step` (config, tokenizer fingerprint, seed, MetaP), if any."""
        if not (self.directory / str(step) / "meta").is_dir():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        if self._failed:  # reported already; what is left to close is the failed save
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        with self._saving(None):
            self.manager.wait_until_finished()
            self.manager.close()


def _causes(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


# TensorStore reports a failed write as: Failed writing: "PATH": ...: No space left on device [os_error_code='28']
_TENSORSTORE_WRITE = re.compile(r'Failed (?:writing|to write)[^"]*"(?P<path>[^"]+)".*?(?P<cause>[A-Z][^:\[\]]*?) '
                                r"\[os_error_code='\d+'\]")
_STEP_IN_PATH = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")


def _save_failure(e: BaseException) -> tuple[str, int | None]:
    """(the cause and the file it hit, the step whose save failed when the path tells) of a failed save."""
    for cause in _causes(e):
        if isinstance(cause, OSError) and cause.strerror:
            path = str(cause.filename or "")
            break
        match = _TENSORSTORE_WRITE.search(str(cause))
        if match:
            cause, path = match["cause"], match["path"]
            break
    else:
        return _reason(e), None
    detail = f"{getattr(cause, 'strerror', cause)}{f' (writing {path})' if path else ''}"
    step = _STEP_IN_PATH.search(path)
    return detail, int(step[1]) if step else None


def check_resume_policy(checkpointer: Checkpointer, policy: str) -> bool:
    """Whether to look for a checkpoint to resume from; raises when the policy cannot be met."""
    latest = checkpointer.latest_step()
    if policy == "never":
        if latest is not None:
            raise ResumeError(f"resume: 'never' but the run directory already has checkpoints (step {latest}); "
                              "pick a new run.dir, or resume=auto to continue it")
        return False
    if policy == "require" and latest is None:
        raise ResumeError("resume: 'require' but the run directory has no checkpoint; "
                          "use resume=auto to start fresh when none exists")
    return latest is not None
