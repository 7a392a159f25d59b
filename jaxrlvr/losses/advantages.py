"""GRPO group-relative advantages (docs/algorithms.md#group-advantages)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["grpo_advantages"]


def grpo_advantages(
    rewards: jax.Array,  # [N], N = P * G, groups of G consecutive responses
    group_size: int,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> jax.Array:  # [N] float32
    """Per-response GRPO advantage ``(R - mean_g R) / (std_g R + eps)``.

    ``rewards`` holds ``N = P * group_size`` entries where each run of ``group_size``
    consecutive entries are the responses to one prompt. The std is unbiased (ddof=1), as
    in the reference code. ``std_normalize=False`` (Dr. GRPO) only subtracts the group mean.
    A group size of 1 has no baseline: the advantage is 0. Broadcast the result over the
    response tokens with ``adv[:, None]``.
    """
    group_size = int(group_size)
    rewards = jnp.asarray(rewards, jnp.float32)
    (n,) = rewards.shape
    if group_size < 1 or n % group_size:
        raise ValueError(f"len(rewards)={n} is not a multiple of group_size={group_size}")
    if group_size == 1:
        return jnp.zeros_like(rewards)
    r = rewards.reshape(n // group_size, group_size)  # [P, G]
    mean = r.mean(axis=1, keepdims=True)  # [P, 1]
    adv = r - mean  # [P, G]
    if std_normalize:
        std = jnp.sqrt(jnp.sum(adv * adv, axis=1, keepdims=True) / (group_size - 1))  # [P, 1]
        adv = adv / (std + eps)
    return adv.reshape(n)
