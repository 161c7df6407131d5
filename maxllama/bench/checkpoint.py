"""`make bench-ckpt`: checkpoint save time, how long an asynchronous save blocks the training loop, and
restore time, for the tiny model and a ~300M-parameter one.

    python -m maxllama.bench.checkpoint [CONFIG ...]
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax

from maxllama.checkpoint.manager import Checkpointer
from maxllama.config import load_config
from maxllama.model.build import define_model, init_params
from maxllama.model.param_count import count_params
from maxllama.parallel.mesh import build_mesh
from maxllama.parallel.rules import LogicalSharding
from maxllama.train.optimizer import build_optimizer
from maxllama.train.schedules import make_schedule
from maxllama.train.step import init_state

DEFAULT_CONFIGS = ["experiments/tiny.yaml", "experiments/bench/ckpt_300m.yaml"]


def bench(path: str) -> None:
    cfg, _ = load_config(path)
    sharding = LogicalSharding(build_mesh(cfg.mesh))
    model = define_model(cfg, sharding)
    optimizer = build_optimizer(cfg, model.rules, make_schedule(cfg.optim, cfg.train.steps))
    state = init_state(init_params(cfg, model, sharding), optimizer)
    jax.block_until_ready(state)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with tempfile.TemporaryDirectory() as tmp:
        sync = Checkpointer(f"{tmp}/sync", cfg.checkpoint.model_copy(update={"async_save": False}))
        t = time.perf_counter()
        sync.save(1, state, wait=True)
        sync_save = time.perf_counter() - t
        asynchronous = Checkpointer(f"{tmp}/async", cfg.checkpoint.model_copy(update={"async_save": True}))
        t = time.perf_counter()
        asynchronous.save(1, state)
        blocked = time.perf_counter() - t
        asynchronous.manager.wait_until_finished()
        async_total = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(asynchronous.restore(1, state))
        restore = time.perf_counter() - t
        sync.close()
        asynchronous.close()
    total = count_params(cfg, model).total
    print(f"{path}: {total / 1e6:.1f}M parameters, {n_bytes / 1e9:.2f} GB of state | synchronous save "
          f"{sync_save:.2f} s | async save blocks the loop {blocked:.3f} s ({blocked / sync_save:.1%} of a "
          f"synchronous save), completes in {async_total:.2f} s | restore {restore:.2f} s")


def main() -> None:
    for path in sys.argv[1:] or DEFAULT_CONFIGS:
        bench(path)


if __name__ == "__main__":
    main()
