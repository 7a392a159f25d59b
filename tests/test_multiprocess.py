"""Two JAX processes on localhost (4 CPU devices each) share one (1, 4, 2) mesh."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from hf_reference import save_random_hf_checkpoint, tiny

from jaxrlvr.models import load_hf_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def test_two_process_sharded_load_forward_and_export(tmp_path):
    cfg = tiny(tie_word_embeddings=False)
    save_random_hf_checkpoint(cfg, tmp_path / "ckpt")
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, coordinator, str(i), str(tmp_path / "ckpt"), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            pytest.fail(f"worker failed ({p.returncode}):\n{out[-3000:]}")

    ref = load_hf_checkpoint(tmp_path / "ckpt")
    expected = np.asarray(ref(jnp.asarray(ids)))
    got = np.load(tmp_path / "logits.npy")
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    exported = load_hf_checkpoint(tmp_path / "export")
    np.testing.assert_array_equal(np.asarray(exported.lm_head[...]), np.asarray(ref.lm_head[...]))
    np.testing.assert_array_equal(
        np.asarray(exported.layers.attn.o_kernel[...][1]),
        np.asarray(ref.layers.attn.o_kernel[...][1]),
    )
