"""Orbax checkpoints of the train state, and the resume policy (`resume: auto | never | require`).

A checkpoint is one Orbax step with two items, `params` and `opt_state`, so a model can be restored without
its optimizer (sampling, scoring, export, `init_from:`); an imported model has `params` alone. The data order
is a function of (seed, step), so the step is all the data pipeline needs to resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from maxllama.train.step import TrainState


class ResumeError(RuntimeError):
    """The resume policy cannot be honoured (no checkpoint to require, or one in the way of `never`)."""


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings of `tree`'s arrays: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: Path, *, every_steps: int = 0, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self.every_steps = every_steps

    @property
    def directory(self) -> Path:
        return Path(self.manager.directory)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
        """Save when `step` is due (every `every_steps`, or forced); the step is passed in rather than read
        from `state` so that deciding never waits for the device."""
        due = force or (self.every_steps > 0 and step % self.every_steps == 0)
        if not due or step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state)),
            force=True)

    def save_params(self, step: int, params: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore into the structure, dtypes and shardings of `target` (abstract or concrete)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target.params)),
            opt_state=ocp.args.StandardRestore(abstract_tree(target.opt_state))))
        return TrainState(jax.numpy.asarray(step, jax.numpy.int32), restored.params, restored.opt_state)

    def restore_params(self, step: int, target: Any) -> dict:
        """Parameters alone, cast to the target's dtypes and laid out with its shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_tree(target))))
        return restored.params

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def step_to_resume(checkpointer: Checkpointer, policy: str) -> int | None:
    """The checkpoint step to restore, or None to start fresh."""
    latest = checkpointer.latest_step()
    if policy == "never":
        if latest is not None:
            raise ResumeError(f"resume: 'never' but the run directory already has checkpoints (step {latest}); "
                              "pick a new run.dir, or resume=auto to continue it")
        return None
    if policy == "require" and latest is None:
        raise ResumeError("resume: 'require' but the run directory has no checkpoint; "
                          "use resume=auto to start fresh when none exists")
    return latest
