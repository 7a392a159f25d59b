"""How long a training step takes, from a roofline: for each compiled program, the largest
of its FLOPs at the chip's peak, the bytes it moves at the chip's HBM bandwidth, and the
bytes its collectives exchange at the chip's interconnect bandwidth (the three are taken
to overlap perfectly), times the calls a step makes of it.

Used by `jaxrlvr.plan` (its time table, `--compare`, `--mean_response_len`). The chip
numbers are the published per-chip figures of each TPU generation (Cloud TPU system
architecture pages); the local devices (CPU, GPU without a table entry) are measured.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # per second, bf16 matmul (per device of the plan's mesh)
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect, per chip
    source: str


# Per chip (bf16 peak, HBM bandwidth, bidirectional ICI bandwidth), from the "key
# specifications" of cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 300e9, "Cloud TPU v4 specs"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 400e9, "Cloud TPU v5e specs"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 1200e9, "Cloud TPU v5p specs"),
    "v6e": Chip("TPU v6e", 918e12, 1638e9, 800e9, "Cloud TPU v6e specs"),
}


def measure_local(device=None, size: int = 1024, copy_mib: int = 64) -> Chip:
    """A local device's matmul rate and memory bandwidth, measured (best of 5): a
    `size`^3 float32 matmul and a `copy_mib` MiB copy. Local devices share one memory, so
    the interconnect is taken to be as fast as it."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    x = jax.device_put(jnp.ones((copy_mib << 18,), jnp.float32), device)
    matmul, copy = jax.jit(lambda m: m @ m), jax.jit(lambda v: v * 1.0001)

    def best(fn, arg) -> float:
        fn(arg).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(arg).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    flops = 2 * size**3 / best(matmul, a)
    bandwidth = 2 * x.nbytes / best(copy, x)  # read and write
    return Chip(
        f"local {device.platform}",
        flops,
        bandwidth,
        bandwidth,
        f"measured here: {flops / 1e9:.1f} GFLOP/s float32 matmul, {bandwidth / 1e9:.1f} GB/s copy",
    )


@dataclasses.dataclass(frozen=True)
class Estimate:
    seconds: float  # one call
    bound: str  # compute | memory | collectives


def call_time(flops: float, bytes_accessed: float, collective_bytes: float, chip: Chip) -> Estimate:
    """The roofline time of one call (per chip quantities)."""
    terms = {
        "compute": flops / chip.peak_flops,
        "memory": bytes_accessed / chip.hbm_bytes_per_s,
        "collectives": collective_bytes / chip.ici_bytes_per_s,
    }
    bound = max(terms, key=terms.get)
    return Estimate(terms[bound], bound)


def generate_calls(sequences: int, slots: int, mean_len: float, decode_steps: int) -> int:
    """`generate` calls a step makes: the tokens to decode over the tokens one call
    decodes (every slot, `decode_steps` each), and never fewer than one sequence's length
    needs (continuous batching refills slots as sequences end)."""
    if mean_len <= 0:
        return 0
    return max(
        math.ceil(sequences * mean_len / (slots * decode_steps)), math.ceil(mean_len / decode_steps)
    )


def gather_bytes(param_bytes: float, shards: int) -> float:
    """Per chip bytes an all-gather (or reduce-scatter) of `param_bytes` sharded over
    `shards` devices receives (or sends)."""
    return param_bytes * (shards - 1) / shards if shards > 1 else 0.0


def summarize(seconds_per_step: float, steps: int, chips: int) -> dict[str, float]:
    hours = seconds_per_step * steps / 3600
    return {"step_s": seconds_per_step, "run_hours": hours, "chip_hours": hours * chips}


def bytes_accessed(compiled) -> float:
    """XLA's count of the bytes one call reads and writes (per device), 0 if unknown."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not report costs
        return 0.0
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(np.nan_to_num((cost or {}).get("bytes accessed", 0.0)))
