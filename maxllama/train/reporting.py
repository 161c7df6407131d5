"""What the loop reports about its steps: metric rows (with their interval's throughput) to metrics.jsonl and
TensorBoard, the non-finite policy, and the progress bar.

A step's metrics stay on the device until a flush fetches a batch of them: fetching every step would make
the host wait for the device each step.
"""

from __future__ import annotations

from typing import Any, Mapping

from maxllama.base.signals import NonFiniteStop
from maxllama.parallel.distributed import to_host
from maxllama.train.metrics import MetricsLog
from maxllama.train.throughput import Throughput


class StepReporter:
    def __init__(self, metrics_log: MetricsLog, progress, throughput: Throughput, *, nonfinite: str,
                 constant: Mapping[str, Any]):
        self.metrics_log, self.progress, self.throughput = metrics_log, progress, throughput
        self.nonfinite_policy = nonfinite
        self.constant = dict(constant)  # fields every row carries (the data's skipped-record counts)
        self.pending: list[tuple[int, dict]] = []
        self.val_losses: dict[int, float] = {}
        self.nonfinite_steps = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.progress.update(1)

    def add_validation(self, step: int, val_loss: float, unigram_entropy: float) -> None:
        self.val_losses[step] = val_loss
        self.progress.write(f"step {step}: val_loss {val_loss:.4f}  (unigram entropy {unigram_entropy:.4f})")

    def flush(self) -> None:
        """Write the pending rows; stop (NonFiniteStop) on a non-finite step if the policy says so."""
        if not self.pending:
            return
        rows, self.pending = to_host(self.pending), []
        interval = self.throughput.record(len(rows))
        tokens_per_step = self.throughput.tokens_per_step
        for step, metrics in rows:
            self.metrics_log.write({
                "step": step, **metrics, **self.constant, "tokens_per_s": interval.tokens_per_s, "mfu": interval.mfu,
                "step_time_s": interval.step_time_s, "data_wait_s": interval.data_wait_s,
                "tokens_seen": step * tokens_per_step,
                **({"val_loss": self.val_losses.pop(step)} if step in self.val_losses else {})})
        self.metrics_log.flush()
        self._apply_nonfinite_policy([step for step, metrics in rows if metrics.get("nonfinite")])
        self.progress.set_postfix(loss=f"{float(rows[-1][1]['loss']):.3f}", tok_s=f"{interval.tokens_per_s:,.0f}",
                                  mfu=f"{interval.mfu:.1%}")

    def _apply_nonfinite_policy(self, bad: list[int]) -> None:
        self.nonfinite_steps += len(bad)
        if bad and self.nonfinite_policy == "stop":
            raise NonFiniteStop(f"non-finite loss or gradient at step {bad[0]} (the update was not applied); "
                                f"lower optim.lr, check the data, or set train.nonfinite=skip")
        if bad:
            self.progress.write(f"skipped the non-finite update of step(s) {bad} ({self.nonfinite_steps} so far)")
