"""Orbax checkpoints of the train state, the save policy, and the resume policy (`resume: auto|never|require`).

A checkpoint is one Orbax step, written atomically (into a temporary folder renamed when complete), with
items `params`, `opt_state` and `meta` (data-iterator state, resolved config, MetaP table, seed), so a model
can be restored without its optimizer (sampling, scoring, export, `init_from:`); an imported model has
`params` alone. Saves are asynchronous: the loop waits only while arrays are copied off the device.
Restoring tries the newest checkpoint first and falls back, with a warning, past any that cannot be read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from maxllama.config.schema import CheckpointConfig
from maxllama.train.step import TrainState


class ResumeError(RuntimeError):
    """The resume policy cannot be honoured (no checkpoint to require, or one in the way of `never`)."""


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings of `tree`'s arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: Path, policy: CheckpointConfig | None = None):
        self.policy = policy or CheckpointConfig()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.policy.keep, keep_period=self.policy.keep_every or None, create=True,
            enable_async_checkpointing=self.policy.async_save)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self._last_save_time = time.monotonic()

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
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._last_save_time = time.monotonic()
        if wait:
            self.manager.wait_until_finished()
        return saved

    def save_params(self, step: int, params: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore into the structure, dtypes and shardings of `target` (abstract or concrete): a checkpoint
        saved on one mesh restores onto another."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target.params)),
            opt_state=ocp.args.StandardRestore(abstract_tree(target.opt_state))))
        step_array = jnp.asarray(step, jnp.int32)
        if hasattr(target.step, "sharding"):
            step_array = jax.device_put(step_array, target.step.sharding)
        return TrainState(step_array, restored.params, restored.opt_state)

    def restore_newest(self, target: TrainState, log: Callable[[str], None]) -> TrainState | None:
        """The newest checkpoint that restores, warning about each broken one skipped; None if none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, target)
            except Exception as e:  # Orbax/TensorStore raise many types for truncated or missing files
                log(f"warning: checkpoint {self.directory}/{step} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); trying the previous one")
        return None

    def restore_params(self, step: int, target: Any) -> dict:
        """Parameters alone, cast to the target's dtypes and laid out with its shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target))))
        return restored.params

    def meta(self, step: int) -> dict | None:
        """The JSON metadata saved with checkpoint `step` (data-iterator state, config, MetaP), if any."""
        if not (self.directory / str(step) / "meta").is_dir():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
