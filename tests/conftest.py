"""Test setup: 8 fake CPU devices for sharding tests, and Hugging Face reference models."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Eight CPU devices share two cores here: a device thread can wait at a collective for
# longer than XLA's default rendezvous timeouts (which abort the process) while the
# others compute. Waits are bounded by the test's own time instead.
for flag in (
    "--xla_cpu_collective_call_terminate_timeout_seconds=3600",
    "--xla_cpu_collective_timeout_seconds=3600",
):
    if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
