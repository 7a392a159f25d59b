"""Several processes (TPU hosts, GPU nodes, or localhost) on one global mesh.

Every process runs the same program on the same global arrays; what the host does between
programs (the data order, the sampler's scheduling, the controllers) is deterministic and
identical on every process, and checked to be (`check_same`). Host work that is heavy is
split: each process scores its share of the rewards (`share`, `gather`). With one process
every function here is the identity or a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from typing import Any

import jax
import numpy as np


class DistributedError(RuntimeError):
    """A multi-process setup problem; the message is one line naming the cause."""


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout_s: int = 300,
) -> None:
    """Join the processes of a run (`jax.distributed.initialize`).

    Explicit `coordinator_address` / `num_processes` / `process_id`, or `auto=True` to let
    JAX read them from the environment (Cloud TPU, SLURM). On CPUs the collectives go
    through gloo, so the same command works on localhost.
    """
    explicit = coordinator_address is not None
    if not explicit and not auto:
        return
    if explicit and (num_processes is None or process_id is None):
        raise DistributedError(
            "--coordinator_address needs --num_processes and --process_id as well"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id={process_id} is not in [0, --num_processes={num_processes})"
        )
    if explicit and process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # the coordinator never answered, or the counts disagree
        where = coordinator_address or "the address JAX detected"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"could not join the run at {where} within {timeout_s} s "
            f"(process {process_id} of {num_processes}): {first}"
        ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Until process 0 listens at `address` (JAX aborts the process, uncatchably, when
    the coordinator never answers; this fails first, with the address)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator_address={address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"could not join the run at {address} within {timeout_s} s: the "
                    f"coordinator (process 0) does not answer ({e.strerror or e})"
                ) from None
            time.sleep(0.5)


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def to_host(x: Any) -> Any:
    """A tree of jax arrays as numpy on every process (gathered where not addressable)."""

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(jax.device_get(a) if isinstance(a, jax.Array) else a)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, x)


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from the same host array on every process: each device gets its
    slice, whichever process it belongs to."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def share(n: int) -> slice:
    """This process's contiguous share of `n` items (the first processes take one more)."""
    p, i = jax.process_count(), jax.process_index()
    size, extra = divmod(n, p)
    start = i * size + min(i, extra)
    return slice(start, start + size + (i < extra))


def gather(local: np.ndarray, n: int) -> np.ndarray:
    """The `share`s of every process put back together: `[n, ...]` on every process."""
    if not is_multiprocess():
        return local
    from jax.experimental import multihost_utils

    p = jax.process_count()
    width = -(-n // p)
    padded = np.zeros((width, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded))  # [P, width, ...]
    sizes = [n // p + (i < n % p) for i in range(p)]
    return np.concatenate([every[i, : sizes[i]] for i in range(p)])


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order (`[text]` with one process): how processes
    that each judged something on their own learn every judgement before acting."""
    if not is_multiprocess():
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))  # [P]
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[: len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(padded))  # [P, width]
    return [bytes(every[i, : sizes[i]]).decode() for i in range(len(every))]


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value (arrays as lists)."""

    def default(o):
        if isinstance(o, jax.Array | np.ndarray | np.generic):
            return np.asarray(o).tolist()
        raise TypeError(f"cannot fingerprint {type(o).__name__}")

    blob = json.dumps(value, sort_keys=True, default=default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same(what: str, value: Any) -> None:
    """Raise `DistributedError` unless `value` is identical on every process."""
    if not is_multiprocess():
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(fingerprint(value)), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # [P, 8]
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(
            f"{what} differs between processes (process 0 vs {differ}); "
            "every process must run the same config, code and checkpoint"
        )


def check_shared_directory(directory: str) -> None:
    """Every process writes a marker into `directory` and reads every other's: a
    directory that is not shared (a local disk per host) fails here, before the run
    writes anything else."""
    if not is_multiprocess():
        return
    from jax.experimental import multihost_utils

    token = uuid.uuid4().hex if jax.process_index() == 0 else "0" * 32
    token = bytes(
        np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(token.encode(), np.uint8)))
    ).decode()
    markers = os.path.join(directory, ".processes", token)
    os.makedirs(markers, exist_ok=True)
    with open(os.path.join(markers, str(jax.process_index())), "w") as f:
        f.write(str(os.getpid()))
    multihost_utils.sync_global_devices(f"jaxrlvr markers {token}")
    missing = [
        i for i in range(jax.process_count()) if not os.path.exists(os.path.join(markers, str(i)))
    ]
    multihost_utils.sync_global_devices(f"jaxrlvr markers read {token}")
    if jax.process_index() == 0:
        shutil.rmtree(os.path.dirname(markers), ignore_errors=True)
    if missing:
        raise DistributedError(
            f"workdir {directory!r} is not shared between processes: process "
            f"{jax.process_index()} cannot see the markers of processes {missing} "
            "(put the workdir on a file system every host mounts, e.g. a GCS bucket or NFS)"
        )
