"""Where metrics go: `metrics.jsonl` (one object per step), TensorBoard, and the console."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from tensorboardX import SummaryWriter

from maxllama.base.signals import SaveFailed


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends rows to metrics.jsonl and mirrors the numbers to TensorBoard.

    Opening a run that resumes from step s drops rows past s: they belong to work that was lost with the
    process, and will be logged again.
    """

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool, enabled: bool = True):
        """`enabled=False` (every process but the first of a multi-host job) writes nothing."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self._truncate_after(resume_step)
        self._file = self.path.open("a") if enabled else None
        self._writer = SummaryWriter(str(run_dir / "tensorboard")) if tensorboard and enabled else None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            raise SaveFailed(f"cannot write {self.path}: {e.strerror}; the checkpoints saved so far are intact. "
                             f"Fix the cause (free space, permissions) and re-run the same command to resume") from None

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {key: _plain(value) for key, value in row.items()}
        with self._writing():
            self._file.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        with self._writing():
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        with contextlib.suppress(SaveFailed, OSError):  # a failed write was reported where it happened
            self.flush()
        with contextlib.suppress(OSError):
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> float:
    """The step of a metrics row; a torn row (its write cut short by a full disk or a kill) counts as none."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if _step_of(line) < math.inf]
