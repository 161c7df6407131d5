"""Orbax checkpoints of the train state, and the resume policy (`resume: auto | never | require`).

The data order is a function of (seed, step), so the step is all the data pipeline needs to resume.
"""

from __future__ import annotations

from pathlib import Path
import orbax.checkpoint as ocp

from maxllama.train.step import TrainState


class ResumeError(RuntimeError):
    """`resume: require` found no checkpoint."""


class Checkpointer:
    def __init__(self, directory: Path, *, every_steps: int, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self.every_steps = every_steps

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
        """Save when `step` is due (every `every_steps`, or forced); the step is passed in rather than read
        from `state` so that deciding never waits for the device."""
        due = force or (self.every_steps > 0 and step % self.every_steps == 0)
        if not due or step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=True)

    def restore(self, step: int, target: TrainState) -> TrainState:
        """Restore into the structure, dtypes and shardings of `target` (abstract or concrete)."""
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target._asdict()))
        return TrainState(**restored)

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

