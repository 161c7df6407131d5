"""Multi-host start-up: `jax.distributed.initialize`, from the config, the environment, or the scheduler.

Explicit values (`distributed.*`, or MAXLLAMA_COORDINATOR / MAXLLAMA_NUM_PROCESSES / MAXLLAMA_PROCESS_ID, which
launch/local sets) win; otherwise JAX detects SLURM, TPU VM and Kubernetes jobs by itself. One process with
no cluster around it stays single-process. CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from maxllama.config.schema import DistributedConfig

CLUSTER_HINTS = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(cfg: DistributedConfig) -> None:
    """Join the job's processes; a no-op for a single process. Call before anything touches a device."""
    cpu_devices = cfg.cpu_devices_per_process or _env_int("MAXLLAMA_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    coordinator = cfg.coordinator or os.environ.get("MAXLLAMA_COORDINATOR")
    num_processes = cfg.num_processes or _env_int("MAXLLAMA_NUM_PROCESSES")
    process_id = cfg.process_id if cfg.process_id is not None else _env_int("MAXLLAMA_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator and (num_processes or 1) > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif (_env_int("SLURM_NTASKS") or 1) > 1 or any(os.environ.get(k) for k in CLUSTER_HINTS[1:]):
        jax.distributed.initialize()


def is_primary() -> bool:
    """Process 0 writes the run directory's files and talks to the console."""
    return jax.process_index() == 0


def to_host(tree):
    """Fetch arrays to numpy, including globally replicated ones that span other hosts' devices."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(x) if isinstance(x, jax.Array) else x
    return jax.tree.map(fetch, tree)


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag becomes true on every process when it is true on any: decisions that all processes must
    take together (stop, save), settled with one collective."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array(flags, dtype=bool))
    return tuple(bool(f) for f in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))
