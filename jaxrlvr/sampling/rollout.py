"""Rollout driver: many prompts, `n` samples each, through an `Engine` with continuous batching.

`generate(model, prompts, params, max_slots=...)` returns, per prompt, `params.n`
`Completion`s. Requests are the (prompt, sample) pairs in order; the `n` samples of a
prompt share one prefill. Prompts are prefilled in batches of one length bucket (the
prompt a refill needs and the next ones of its bucket, up to `max_prefill_batch`), and the
requests that get free slots together are inserted with one call per prefill batch. With
continuous batching a slot is refilled as soon as its sequence finishes: the compiled
decode loop returns to the host once a slot frees up (and at the latest after
`decode_steps` steps) while requests are waiting. Each decode block costs one host sync,
which also reads the first tokens of the requests inserted before it. With
`continuous=False` (static batching, for comparison) a new batch starts only when every
slot of the previous one has finished.

Request (i, j) (prompt i, sample j) draws its t-th token with the key
`fold_in(fold_in(fold_in(PRNGKey(seed), i), j), t)`: outputs depend on the seed only, not
on `max_slots`, the slot a request ran in or when it was scheduled.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrlvr.models.qwen2 import Qwen2
from jaxrlvr.sampling.engine import (
    MAX_PREFILL_BATCH,
    Engine,
    Prefix,
    next_power_of_two,
    validate_sampling,
)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample the completions of a prompt.

    n: samples per prompt (the GRPO group size). temperature: 0 = greedy. top_p: nucleus
    mass in (0, 1] (1 = off). top_k: 0 = off. max_new_tokens: budget per completion.
    stop_token_ids: generation ends after emitting one of these (it is included in the
    completion). seed: with the prompt and sample index, fixes every random draw.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"n={self.n!r}: must be an int >= 1")
        validate_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens)
        stop = tuple(self.stop_token_ids)
        if not all(isinstance(t, (int, np.integer)) and t >= 0 for t in stop):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be ints >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}: must be an int in [0, 2**32)")


@dataclasses.dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    logprobs: list[float]  # log_softmax(logits / T)[token] per token (greedy: T = 1)
    finish_reason: Literal["stop", "length"]


# --------------------------------------------------------------------------- validation


def _validate(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    vocab_size: int,
    max_prefill_length: int | None,
) -> list[SamplingParams]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"params: got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    for i, sp in enumerate(per_prompt):
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"params[{i}] is a {type(sp).__name__}, not SamplingParams")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence | np.ndarray):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
        if max_prefill_length is not None and len(p) > max_prefill_length:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens, more than max_prefill_length="
                f"{max_prefill_length}"
            )
        arr = np.asarray(p)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must be a flat list of int token ids")
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"prompts[{i}] has token id {int(bad[0])} outside the vocabulary [0, {vocab_size})"
            )
    return per_prompt


@jax.jit
def _request_keys(seed_keys, prompt_idx, sample_idx):
    """`[N, 2]` raw keys fold_in(fold_in(seed_key, i), j)."""

    def one(key, i, j):
        return jax.random.fold_in(jax.random.fold_in(key, i), j)

    return jax.vmap(one)(seed_keys, prompt_idx, sample_idx)


# --------------------------------------------------------------------------- driver


class _Batch:
    """One `prefill_batch` call: its device prefix and, once read, its first tokens."""

    def __init__(self, prefix: Prefix):
        self.prefix = prefix
        self.first: tuple[np.ndarray, np.ndarray] | None = None  # tokens, logprobs [R, n]


class _Placed(NamedTuple):
    """A request inserted into a slot from row `row`, sample `sample` of `batch`."""

    slot: int
    request: int
    batch: _Batch
    row: int
    sample: int


class _Native:
    """The engine's batched calls: the prompts of one bucket are prefilled together (the
    prompt needed now and the next ones of its bucket, up to `max_prefill_batch`), the
    requests given slots in one refill are inserted with one call per prefill batch, and
    their first tokens are read with the next decode block (one host sync per block)."""

    def __init__(self, rollout: _Rollout):
        self.rollout, self.engine = rollout, rollout.engine
        # Prompts not prefilled yet, per bucket, in request order.
        self.unfilled: dict[int, collections.deque[int]] = collections.defaultdict(
            collections.deque
        )
        for i, prompt in enumerate(rollout.prompts):
            self.unfilled[self.engine.bucket(len(prompt))].append(i)
        self.where: dict[int, tuple[_Batch, int]] = {}  # prompt -> (its batch, row)
        self.pending: list[_Placed] = []  # inserted; first tokens not read yet

    def _prefill(self, bucket: int) -> None:
        """Prefill the next prompts of `bucket`. Requests are served in order, so the prompt
        a refill needs is always the head of its bucket's queue."""
        ro, eng = self.rollout, self.engine
        queue = self.unfilled[bucket]
        ids = [queue.popleft() for _ in range(min(len(queue), eng.max_prefill_batch))]
        tokens, lengths = eng.pad_batch([ro.prompts[i] for i in ids])
        requests = [[ro.request_params(r) for r in ro.requests_of(i)] for i in ids]
        prefix = eng.prefill_batch(
            params=eng.params, padded_tokens=tokens, true_lengths=lengths, requests=requests
        )
        batch = _Batch(prefix)
        self.where.update((i, (batch, row)) for row, i in enumerate(ids))

    def refill(self, state, todo: list[tuple[int, int]]):
        """Insert request r into slot s for each (s, r) of `todo`."""
        ro = self.rollout
        for _, r in todo:
            i = ro.requests[r][0]
            if i not in self.where:
                self._prefill(self.engine.bucket(len(ro.prompts[i])))
        groups: dict[int, list[_Placed]] = {}  # by prefill batch: one insert each
        for slot, r in todo:
            i, j = ro.requests[r]
            batch, row = self.where[i]
            groups.setdefault(id(batch), []).append(_Placed(slot, r, batch, row, j))
            if j == ro.per_prompt[i].n - 1:  # its last sample: the row is used up
                del self.where[i]
        for group in groups.values():
            state = self.engine.insert_batch(
                group[0].batch.prefix,
                state,
                slots=[p.slot for p in group],
                rows=[p.row for p in group],
                samples=[p.sample for p in group],
            )
            self.pending += group
        return state

    def step(self, state, refill_at: int):
        """Decode a block; returns the state, the first tokens of the requests inserted
        since the last step as (slot, request, token, logprob), and a host `StepResult`."""
        eng = self.engine
        state, res = eng.generate_steps(eng.params, state, refill_at=refill_at)
        batches = {id(p.batch): p.batch for p in self.pending if p.batch.first is None}
        unread = list(batches.values())  # one host sync: the block and these first tokens
        res, firsts = jax.device_get((res, [(b.prefix.token, b.prefix.logprob) for b in unread]))
        for batch, first in zip(unread, firsts, strict=True):
            batch.first = first
        out = [
            (p.slot, p.request, *(a[p.row, p.sample] for a in p.batch.first)) for p in self.pending
        ]
        self.pending = []
        return state, out, res


class _JetStream:
    """Through the JetStream adapter: one prompt per prefill (forked for its n samples),
    one slot per insert, one decode step per generate."""

    def __init__(self, rollout: _Rollout):
        from jaxrlvr.sampling.jetstream import JetStreamAdapter

        self.rollout, self.engine = rollout, rollout.engine
        self.adapter = JetStreamAdapter(rollout.engine)
        self.prefixes: dict[int, collections.deque[Prefix]] = {}
        self.pending: list[tuple[int, int, Any, Any]] = []  # slot, request, token, logprob

    def _prefix(self, r: int) -> Prefix:
        """The prefix of request r: its prompt is prefilled once, forked for all samples."""
        ro, eng = self.rollout, self.engine
        i = ro.requests[r][0]
        if i not in self.prefixes:
            reqs = [ro.request_params(q) for q in ro.requests_of(i)]
            padded, n = eng.pad(ro.prompts[i])
            base = self.adapter.prefill_prefix(
                params=eng.params, padded_tokens=padded, true_length=n, request=reqs[0]
            )
            self.prefixes[i] = collections.deque(eng.fork(base, reqs))
        queue = self.prefixes[i]
        prefix = queue.popleft()
        if not queue:
            del self.prefixes[i]
        return prefix

    def refill(self, state, todo: list[tuple[int, int]]):
        for slot, r in todo:
            prefix = self._prefix(r)
            state = self.adapter.insert(prefix, state, slot)
            self.pending.append((slot, r, prefix.token, prefix.logprob))
        return state

    def step(self, state, refill_at: int):
        state, result_tokens = self.adapter.generate(self.engine.params, state)
        out, self.pending = self.pending, []
        return state, out, self.adapter.step_result(result_tokens)


def generate(
    model: Qwen2 | Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    max_slots: int = 64,
    max_prefill_length: int | None = None,
    max_target_length: int | None = None,
    decode_steps: int = 8,
    max_prefill_batch: int = MAX_PREFILL_BATCH,
    continuous: bool = True,
    backend: Literal["native", "jetstream"] = "native",
    progress: bool | None = None,
    mesh: Mesh | None = None,
) -> list[list[Completion]]:
    """Sample `n` completions per prompt; returns `out[i][j]` for prompt i, sample j.

    Args:
      model: a `Qwen2`, or an `Engine` to reuse (its slots, lengths and current
        parameters; the size arguments below are then ignored).
      prompts: token-id lists (non-empty, each at most `max_prefill_length` long).
      params: one `SamplingParams` for all prompts, or one per prompt.
      max_slots: decode slots (concurrent sequences).
      max_prefill_length: longest prompt (default: the next power of two >= the longest
        prompt, at least 16). Fix it across calls to reuse compilations.
      max_target_length: KV-cache positions per slot (default: max_prefill_length +
        the largest max_new_tokens).
      decode_steps: decode steps per host round trip.
      max_prefill_batch: most prompts per prefill call.
      continuous: refill freed slots at once (False: static batches, for benchmarks).
      backend: "native", or "jetstream" to drive the engine through the JetStream adapter
        (one step per call; same tokens).
      progress: show a tqdm bar of finished completions (None: only on a terminal).
      mesh: mesh for a new engine (default: all devices on 'fsdp').
    """
    if backend not in ("native", "jetstream"):
        raise ValueError(f"backend={backend!r}: expected 'native' or 'jetstream'")
    if isinstance(model, Engine):
        engine = model
        max_prefill_length = engine.max_prefill_length
        vocab = engine.config.vocab_size
    elif isinstance(model, Qwen2):
        vocab = model.config.vocab_size
    else:
        raise ValueError(f"model must be a Qwen2 or an Engine, got {type(model).__name__}")
    per_prompt = _validate(prompts, params, vocab, max_prefill_length)
    if not isinstance(max_slots, (int, np.integer)) or max_slots < 1:
        raise ValueError(f"max_slots={max_slots!r}: must be an int >= 1")
    if not prompts:
        return []
    longest_budget = max(sp.max_new_tokens for sp in per_prompt)
    if not isinstance(model, Engine):
        if max_prefill_length is None:
            max_prefill_length = max(16, next_power_of_two(max(len(p) for p in prompts)))
        if max_target_length is None:
            max_target_length = max_prefill_length + longest_budget
        max_stop = max(len(sp.stop_token_ids) for sp in per_prompt)
        engine = Engine(
            model,
            max_concurrent_decodes=int(max_slots),
            max_prefill_length=max_prefill_length,
            max_target_length=max_target_length,
            decode_steps=decode_steps,
            max_prefill_batch=max_prefill_batch,
            max_stop_tokens=max(8, next_power_of_two(max_stop)),
            mesh=mesh,
        )
    for i, (p, sp) in enumerate(zip(prompts, per_prompt, strict=True)):
        if len(sp.stop_token_ids) > engine.max_stop_tokens:
            raise ValueError(
                f"stop_token_ids has {len(sp.stop_token_ids)} ids; the engine holds at most "
                f"max_stop_tokens={engine.max_stop_tokens}"
            )
        if len(p) + sp.max_new_tokens - 1 > engine.max_target_length:
            raise ValueError(
                f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={sp.max_new_tokens} "
                f"do not fit max_target_length={engine.max_target_length}"
            )
    return _Rollout(engine, prompts, per_prompt).run(
        backend, continuous=continuous, progress=progress
    )


class _Rollout:
    """Host-side scheduling of one `generate` call."""

    def __init__(self, engine: Engine, prompts, per_prompt):
        self.engine = engine
        self.prompts, self.per_prompt = prompts, per_prompt
        # Requests in order: (prompt i, sample j); prompt i's are first[i] ... first[i+1]-1.
        self.requests = [(i, j) for i, sp in enumerate(per_prompt) for j in range(sp.n)]
        self.first = np.cumsum([0] + [sp.n for sp in per_prompt])
        seeds = {sp.seed for sp in per_prompt}
        seed_key = {s: np.asarray(jax.random.PRNGKey(s)) for s in seeds}
        idx = np.asarray(self.requests, np.int32).reshape(-1, 2)
        keys = _request_keys(
            jnp.asarray(np.stack([seed_key[per_prompt[i].seed] for i, _ in self.requests])),
            jnp.asarray(idx[:, 0]),
            jnp.asarray(idx[:, 1]),
        )
        self.keys = jax.device_get(keys)  # [N, 2]
        self.tokens: list[list[int]] = [[] for _ in self.requests]
        self.logprobs: list[list[float]] = [[] for _ in self.requests]
        self.reason: list[str | None] = [None] * len(self.requests)

    def requests_of(self, i: int) -> range:
        """The requests (samples) of prompt i."""
        return range(self.first[i], self.first[i + 1])

    def request_params(self, r: int):
        """The engine's `RequestParams` of request r."""
        sp = self.per_prompt[self.requests[r][0]]
        return self.engine.make_request(
            self.keys[r],
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            max_new_tokens=sp.max_new_tokens,
            stop_token_ids=sp.stop_token_ids,
        )

    def _emit(self, r: int, tokens, logprobs, done: bool) -> bool:
        """Append tokens `[m]` (and their log-probs) to request r; returns `done`."""
        self.tokens[r] += np.asarray(tokens).tolist()
        self.logprobs[r] += np.asarray(logprobs, np.float64).tolist()
        if done:
            sp = self.per_prompt[self.requests[r][0]]
            self.reason[r] = "stop" if self.tokens[r][-1] in sp.stop_token_ids else "length"
        return done

    def run(self, backend: str, *, continuous: bool, progress: bool | None):
        eng = self.engine
        driver = _Native(self) if backend == "native" else _JetStream(self)
        slots = eng.max_concurrent_decodes
        owner: list[int | None] = [None] * slots  # request index per slot
        queue = collections.deque(range(len(self.requests)))
        state = eng.init_decode_state()
        bar = tqdm(
            total=len(self.requests),
            desc="rollout",
            unit="seq",
            leave=False,
            disable=None if progress is None else not progress,
        )

        def emit(slot: int, tokens, logprobs, done: bool) -> None:
            if self._emit(owner[slot], tokens, logprobs, done):
                owner[slot] = None
                bar.update(1)

        try:
            while queue or any(o is not None for o in owner):
                if continuous or all(o is None for o in owner):
                    free = [s for s, o in enumerate(owner) if o is None][: len(queue)]
                    todo = [(s, queue.popleft()) for s in free]
                    if todo:
                        state = driver.refill(state, todo)
                        for s, r in todo:
                            owner[s] = r
                refill_at = 1 if continuous and queue else slots + 1
                state, firsts, res = driver.step(state, refill_at)
                # The insert finished (deactivated) a request at its first token just so.
                for slot, r, token, logprob in firsts:
                    sp = self.per_prompt[self.requests[r][0]]
                    done = sp.max_new_tokens <= 1 or int(token) in sp.stop_token_ids
                    emit(slot, [token], [logprob], done)
                # A slot's tokens of the block are a prefix of its column (it only stops).
                counts = np.sum(res.valid, axis=0)  # [B]
                for slot in np.flatnonzero(counts):
                    m = counts[slot]
                    emit(slot, res.tokens[:m, slot], res.logprobs[:m, slot], res.done[m - 1, slot])
        finally:
            bar.close()
        out: list[list[Completion]] = [[] for _ in self.prompts]
        for r, (i, _) in enumerate(self.requests):
            out[i].append(Completion(self.tokens[r], self.logprobs[r], self.reason[r]))
        return out


def num_generated_tokens(out: list[list[Completion]]) -> int:
    """Total tokens across all completions (for throughput numbers)."""
    return sum(len(c.token_ids) for group in out for c in group)
