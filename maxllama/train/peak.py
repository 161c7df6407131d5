"""Peak FLOP/s per device, for MFU: published dense bf16 peaks, or a matmul measured on CPU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 matmul peaks (FLOP/s per chip / GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def table_peak(device_kind: str) -> float | None:
    """Longest table key contained in the device kind ('TPU v5 lite' before 'TPU v5'), or None."""
    matches = [key for key in PEAK_FLOPS if key.lower() in device_kind.lower()]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def measure_matmul_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Best-of-n FLOP/s of a square matmul on the default device: the CPU's practical peak."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops_per_device(compute_dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where the number came from)."""
    device = jax.devices()[0]
    peak = table_peak(device.device_kind)
    if peak is not None:
        return peak, f"table ({device.device_kind})"
    return measure_matmul_peak(compute_dtype), f"measured {compute_dtype} matmul on {device.platform}"
