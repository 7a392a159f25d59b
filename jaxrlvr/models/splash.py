"""The Pallas TPU splash (flash) attention kernel behind `jaxrlvr.models.attention`.

Used where queries start at slot 0 (`Visibility.aligned`): the causal mask is static and
segment ids carry padding and packing. Query heads are grouped on their KV head and each
group runs the kernel's multi-query form; the kernel does not scale the scores, so the
queries are scaled first. Sequences are padded to a multiple of the block with a segment id
of their own (-1), which no real token shares.

Under a mesh the kernel runs per device inside `shard_map`: the batch split as the
activations are, and the KV heads over the tensor axis when they divide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from jaxrlvr.sharding import active_rules, logical_to_spec

Array = jax.Array

MIN_BLOCK = 128  # the TPU kernel's smallest block along the sequence


@functools.cache
def _kernel(length: int, group: int, block: int, interpret: bool):
    mask = sm.MultiHeadMask([sm.CausalMask((length, length))] * group)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q, k, v, q_seg, kv_seg, *, block: int, interpret: bool) -> Array:
    """One device's share: q `[B, T, H, Dh]`, k/v `[B, T, K, Dh]`, segments `[B, T]`."""
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    blk = min(block, -(-t // MIN_BLOCK) * MIN_BLOCK)
    pad = -t % blk
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        q_seg, kv_seg = (
            jnp.pad(s, ((0, 0), (0, pad)), constant_values=-1) for s in (q_seg, kv_seg)
        )
    tp = t + pad
    qg = (q * hd**-0.5).reshape(b, tp, n_kv, h // n_kv, hd).transpose(0, 2, 3, 1, 4)
    kg, vg = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, Dh]
    kernel = _kernel(tp, h // n_kv, blk, interpret)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0))  # over the batch
    out = per_row(qg, kg, vg, sk.SegmentIds(q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, hd)[:, :t]  # [B, T, H, Dh]


def attention(q, k, v, vis, *, block: int = 512, interpret: bool = False) -> Array:
    """Splash attention of `jaxrlvr.models.attention.attention` (aligned queries only)."""
    if not vis.aligned:
        raise ValueError("splash attention needs queries that start at slot 0")
    fn = functools.partial(_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, vis.q_segments, vis.kv_segments)
    shape = dict(mesh.shape)
    # KV heads split over whole query groups: heads k*G .. k*G + G - 1 stay together.
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, shape, active_rules())
    q_spec = PartitionSpec(*kv_spec)
    seg = PartitionSpec(kv_spec[0], None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg, seg),
        out_specs=q_spec,
        check_vma=False,  # the Pallas kernel declares no varying axes
    )(q, k, v, vis.q_segments, vis.kv_segments)
