"""Attention backends against the materialised reference (float32: 1e-5 relative).

The blocked (flash) backend and the Pallas splash kernel (interpret mode on CPU) must give
the reference's outputs and gradients for padded, packed and grouped-query inputs; decode
must visit only the filled prefix of the cache; the blocked backend's memory must grow
linearly with the sequence length.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlvr.models import attention as attn
from jaxrlvr.models.qwen2 import Qwen2, preset, segment_positions


def _qkv(b, t, s, h, k, d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d))
    kv = rng.normal(size=(2, b, s, k, d))
    return (
        jnp.asarray(q, jnp.float32),
        jnp.asarray(kv[0], jnp.float32),
        jnp.asarray(kv[1], jnp.float32),
    )


def _aligned(segments) -> attn.Visibility:
    seg = jnp.asarray(segments, jnp.int32)
    cols = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
    return attn.Visibility(seg, seg, cols, aligned=True)


# left padding, right padding, and three packed sequences with a padded tail
SEGMENTS = np.array(
    [[0] * 5 + [1] * 35, [1] * 30 + [0] * 10, [1] * 12 + [2] * 17 + [3] * 8 + [0] * 3]
)


def _value_and_grads(fn, q, k, v):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_close(got, want, mask=None):
    got, want = np.asarray(got), np.asarray(want)
    if mask is not None:
        got, want = got[mask], want[mask]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("block", [8, 13, 64])
def test_blocked_matches_reference(block):
    """Outputs and gradients of the blocked backend equal the reference's, for key blocks
    that divide the length, do not, and exceed it."""
    q, k, v = _qkv(3, 40, 40, 4, 2, 16)
    vis = _aligned(SEGMENTS)
    ref = _value_and_grads(lambda *a: attn.attention(*a, vis, backend="reference"), q, k, v)
    got = _value_and_grads(
        lambda *a: attn.attention(*a, vis, backend="blocked", block=block), q, k, v
    )
    _assert_close(got[0], ref[0])
    for g, r in zip(got[1], ref[1], strict=True):
        _assert_close(g, r)


def test_splash_matches_reference_in_interpret_mode():
    """The Pallas TPU splash kernel (run by the Pallas interpreter) gives the reference's
    outputs and gradients, with segments and a length that is not a multiple of its block."""
    from jaxrlvr.models import splash

    segments = np.array([[0] * 5 + [1] * 100 + [2] * 45, [1] * 130 + [0] * 20])
    q, k, v = _qkv(2, 150, 150, 4, 2, 64, seed=1)
    vis = _aligned(segments)
    ref = _value_and_grads(lambda *a: attn.attention(*a, vis, backend="reference"), q, k, v)
    got = _value_and_grads(lambda *a: splash.attention(*a, vis, block=128, interpret=True), q, k, v)
    _assert_close(got[0], ref[0])
    for g, r in zip(got[1], ref[1], strict=True):
        _assert_close(g, r)


def test_decode_visits_only_the_filled_prefix():
    """Queries at different cache slots see their own prefix only: stale values after a
    row's slot change nothing, and blocks past the furthest slot are never read (NaN there
    leaves the output finite)."""
    b, s, block = 3, 64, 8
    q, k, v = _qkv(b, 1, s, 4, 2, 16, seed=2)
    slots = jnp.asarray([[3], [17], [30]])  # furthest slot 30: blocks 0..3 of 8 visited
    ones = jnp.ones((b, s), jnp.int32)
    vis = attn.Visibility(ones[:, :1], ones, slots)
    want = attn.attention(q, k, v, vis, backend="reference")
    poisoned = [x.at[:, 32:].set(jnp.nan) for x in (k, v)]
    got = attn.attention(q, *poisoned, vis, backend="blocked", block=block)
    _assert_close(got, want)


def _temp_bytes(backend: str, t: int) -> int:
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    k = v = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, v, seg):
        cols = jnp.broadcast_to(jnp.arange(t), seg.shape)
        vis = attn.Visibility(seg, seg, cols, aligned=True)
        return jnp.sum(attn.attention(q, k, v, vis, backend=backend, block=128) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, k, v, seg).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_is_linear_in_length():
    """Doubling the sequence doubles the blocked backend's temporaries in the backward pass
    (at most 2.2x), where the reference's grow about fourfold."""
    blocked = _temp_bytes("blocked", 2048) / _temp_bytes("blocked", 1024)
    reference = _temp_bytes("reference", 2048) / _temp_bytes("reference", 1024)
    assert blocked <= 2.2, blocked
    assert reference >= 3.5, reference


def test_packed_rows_equal_sequences_alone():
    """A row packing three sequences gives each the hidden states it has alone."""
    model = Qwen2(preset("tiny", attention="blocked", attention_block=8), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 256, n) for n in (9, 14, 5)]
    tokens = jnp.asarray(np.concatenate(seqs + [np.zeros(4, int)])[None])
    segments = jnp.asarray(np.repeat([1, 2, 3, 0], [9, 14, 5, 4])[None])
    packed, _ = model.hidden_states(tokens, segment_ids=segments)
    start = 0
    for seq in seqs:
        alone, _ = model.hidden_states(jnp.asarray(seq[None]))
        _assert_close(packed[0, start : start + len(seq)], alone[0])
        start += len(seq)
    np.testing.assert_array_equal(
        segment_positions(segments)[0],
        np.r_[np.arange(9), np.arange(14), np.arange(5), np.arange(4)],
    )


def test_backend_choice_and_fallback(caplog):
    """`auto` picks the platform's kernel; a kernel the platform lacks falls back to blocked
    with one warning naming both, and is refused by the start-up check."""
    assert attn.platform_backend("auto", "tpu") == "splash"
    assert attn.platform_backend("auto", "gpu") == "cudnn"
    assert attn.platform_backend("auto", "cpu") == "blocked"
    assert attn.check_backend("splash", "tpu") is None
    assert "needs a TPU" in attn.check_backend("splash", "cpu")
    assert "needs a GPU" in attn.check_backend("cudnn", "cpu")
    attn._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert attn.platform_backend("cudnn", "cpu") == "blocked"
    warnings = [r.getMessage() for r in caplog.records if "attention" in r.getMessage()]
    assert warnings == ["attention: cudnn cannot run on cpu; using blocked attention"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.platform_backend("flash")


def test_explicit_kernel_the_platform_lacks_is_refused_at_start():
    """`model.attention=splash` on a CPU run stops before anything loads, naming the key."""
    from jaxrlvr.config import ConfigError, base_config
    from jaxrlvr.rl import preflight

    c = base_config("demo")
    c.model.attention = "splash"
    with pytest.raises(ConfigError, match=r"config.model.attention='splash': .*needs a TPU"):
        preflight.check_attention(c)
    c.model.attention = "auto"
    preflight.check_attention(c)  # auto always runs
