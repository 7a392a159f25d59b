"""Where a rollout batch's rows live: packed sequences, micro-batches, device shards.

The policy pass and the update read sequences packed several to a row: each row holds
whole sequences (prompt then response) back to back, marked by segment ids 1, 2, ... with
positions restarting at 0, and attention stays within a segment. Nothing is padded to
`max_prompt_len`; a row's tail after its last sequence is the only padding.

The LM head runs only where a response token is predicted: `head_positions` lists, per
group, the packed positions whose next token is a response token, back to back (`M` of
them, padded to a bucket), and `head_slots` `[N, R]` says where response token t of each
sequence sits in that list. Losses and metrics stay per sequence, `[N, R]`.

Rows are grouped so that every micro-batch, and every device's share of it, is a slice of
the device's own rows (`device_order`, `split_rows`): the sequences of micro-batch g on
device d are packed into that group's own rows. With packing off, each sequence has a row
of its own (the same layout, one segment per row).
"""

from __future__ import annotations

import jax
import numpy as np

Array = jax.Array


def round_to_bucket(n: int, full: int, buckets: int) -> int:
    """`n` (<= `full`) rounded up to a multiple of `full / buckets`, within [1, full]: at
    most `buckets` sizes, so a bounded number of compiled variants (`train.pack_buckets`)."""
    step = max(1, full // buckets)
    return max(1, min(full, -(-n // step) * step))


def split_rows(tree, parts: int, shards: int = 1):
    """Every leaf `[N, ...]` -> `[parts, N / parts, ...]`, part i taking its rows from each
    of the `shards` contiguous device blocks of N: a local slice on every device."""

    def split(x):
        x = x.reshape(shards, parts, -1, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(parts, -1, *x.shape[3:])

    return jax.tree.map(split, tree)


def merge_rows(tree, shards: int = 1):
    """The inverse of `split_rows`: every leaf `[parts, M, ...]` -> `[parts * M, ...]`."""

    def merge(y):
        y = y.reshape(y.shape[0], shards, -1, *y.shape[2:]).swapaxes(0, 1)
        return y.reshape(-1, *y.shape[3:])

    return jax.tree.map(merge, tree)


def device_order(n: int, micro_batch: int, shards: int) -> np.ndarray:
    """The row order on device: row p of the device batch is row `order[p]` of the logical
    batch, so that `split_rows(batch, n // micro_batch, shards)[g]` is logical micro-batch g
    (rows `g * micro_batch ...`, in order). The identity when `shards` is 1."""
    return np.asarray(merge_rows(np.arange(n).reshape(n // micro_batch, micro_batch), shards))


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` in rows of at most `capacity` tokens (first fit, longest first);
    each row lists its sequences in index order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, f in enumerate(free) if lengths[i] <= f), None)
        if j is None:
            rows.append([])
            free.append(capacity)
            j = len(rows) - 1
        rows[j].append(i)
        free[j] -= int(lengths[i])
    return [sorted(r) for r in rows]


def pack(
    arrays: dict[str, np.ndarray],
    *,
    micro_batch: int,
    shards: int,
    row_len: int,
    enabled: bool = True,
    buckets: int,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The device layout of a rollout batch (`grpo.rollout_batch`) and its packing stats.

    Returns the token fields `tokens`, `segment_ids`, `positions` `[rows, row_len]`, the
    head list `head_positions` `[groups * M]` (row-major index into the group's rows), and
    the sequence fields `head_slots` `[N, R]` (index into the group's head list),
    `response_mask`, `advantages`, `sampler_logp`, all in device order; and `pad_fraction`
    (padding share of the packed tokens), `rows_per_micro_batch` and `head_fraction`
    (response tokens / head list length). Row counts and the head-list length are rounded
    up to one of `buckets` evenly spaced sizes.
    """
    tokens, plen = arrays["tokens"], arrays["prompt_lengths"]
    rlen = arrays["response_mask"].sum(axis=1).astype(np.int64)
    lengths = plen + rlen
    n, r_max = arrays["response_mask"].shape
    if lengths.max(initial=0) > row_len:
        raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the row of {row_len}")
    parts, per = n // micro_batch, micro_batch // shards
    groups = np.arange(n).reshape(parts, shards, per).swapaxes(0, 1)  # [shards, parts, per]
    layouts = {}
    for d, g in np.ndindex(shards, parts):
        ids = groups[d, g]
        rows = first_fit(lengths[ids], row_len) if enabled else [[i] for i in range(per)]
        layouts[d, g] = [[int(ids[i]) for i in row] for row in rows]
    r = round_to_bucket(max(len(v) for v in layouts.values()), per, buckets)
    m = max(int(rlen[groups[d, g]].sum()) for d, g in layouts)  # response tokens per group
    m = round_to_bucket(m, per * r_max, buckets)

    shape = (shards, parts, r, row_len)
    packed = {k: np.zeros(shape, np.int32) for k in ("tokens", "segment_ids", "positions")}
    head = np.zeros((shards, parts, m), np.int32)
    slots = np.zeros((n, r_max), np.int32)
    for (d, g), rows in layouts.items():
        c = 0  # next free entry of the group's head list
        for j, row in enumerate(rows):
            offset = 0
            for k, i in enumerate(row):
                span = slice(offset, offset + lengths[i])
                packed["tokens"][d, g, j, span] = tokens[i, : lengths[i]]
                packed["segment_ids"][d, g, j, span] = k + 1
                packed["positions"][d, g, j, span] = np.arange(lengths[i])
                first = j * row_len + offset + plen[i] - 1  # predicts response token 0
                head[d, g, c : c + rlen[i]] = first + np.arange(rlen[i])
                slots[i, : rlen[i]] = c + np.arange(rlen[i])
                c += rlen[i]
                offset += lengths[i]
    order = device_order(n, micro_batch, shards)
    out = {k: v.reshape(-1, row_len) for k, v in packed.items()}
    out["head_positions"] = head.reshape(-1)
    out["head_slots"] = slots[order]
    for key in ("response_mask", "advantages", "sampler_logp"):
        out[key] = arrays[key][order]
    stats = {
        "pad_fraction": float(1.0 - lengths.sum() / (shards * parts * r * row_len)),
        "rows_per_micro_batch": float(r * shards),
        "head_fraction": float(rlen.sum() / (shards * parts * m)),
    }
    return out, stats


def take_per_shard(x: Array, index: Array, shards: int, keep: int = 0) -> Array:
    """`x[index]` within each device's share: `x` `[shards * a, ..., *F]` is flattened per
    shard (all but its last `keep` dimensions), `index` `[shards * b, ...]` indexes it.
    Returns `[shards * b, ..., *F]`: a local gather on every device."""
    feat = x.shape[x.ndim - keep :] if keep else ()
    flat = x.reshape(shards, -1, *feat)
    idx = index.reshape(shards, -1, *index.shape[1:])
    out = jax.vmap(lambda a, i: a[i])(flat, idx)
    return out.reshape(-1, *out.shape[2:])
