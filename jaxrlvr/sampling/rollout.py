"""Rollout driver: many prompts, `n` samples each, through an `Engine` with continuous batching.

`generate(model, prompts, params, max_slots=...)` returns, per prompt, `params.n`
`Completion`s. Requests are the (prompt, sample) pairs in order; the `n` samples of a
prompt share one prefill (its prefix is forked and inserted `n` times). With continuous
batching a slot is refilled as soon as its sequence finishes: the compiled decode loop
returns to the host once a slot frees up (and at the latest after `decode_steps` steps)
while requests are waiting. With `continuous=False` (static batching, for comparison) a
new batch starts only when every slot of the previous one has finished.

Request (i, j) (prompt i, sample j) draws its t-th token with the key
`fold_in(fold_in(fold_in(PRNGKey(seed), i), j), t)`: outputs depend on the seed only, not
on `max_slots`, the slot a request ran in or when it was scheduled.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxrlvr.models.qwen2 import Qwen2
from jaxrlvr.sampling.engine import (
    Engine,
    Prefix,
    StepResult,
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


class _Backend:
    """The engine calls the driver makes; `jetstream` goes through the adapter."""

    def __init__(self, engine: Engine, backend: str):
        self.engine = engine
        self.adapter = None
        if backend == "jetstream":
            from jaxrlvr.sampling.jetstream import JetStreamAdapter

            self.adapter = JetStreamAdapter(engine)
        elif backend != "native":
            raise ValueError(f"backend={backend!r}: expected 'native' or 'jetstream'")

    def prefill(self, params, padded, n, request) -> Prefix:
        if self.adapter is None:
            return self.engine.prefill(
                params=params, padded_tokens=padded, true_length=n, request=request
            )
        return self.adapter.prefill_prefix(
            params=params, padded_tokens=padded, true_length=n, request=request
        )

    def insert(self, prefix, state, slot):
        return (self.adapter or self.engine).insert(prefix, state, slot)

    def step(self, params, state, refill_at: int) -> tuple[Any, StepResult]:
        """Decode; returns the state and a host (numpy) `StepResult`."""
        if self.adapter is None:
            state, res = self.engine.generate_steps(params, state, refill_at=refill_at)
            res = jax.device_get(res)
            k = int(res.num_steps)
            return state, StepResult(*(a[:k] for a in res[:4]), num_steps=k)
        state, result_tokens = self.adapter.generate(params, state)
        return state, self.adapter.step_result(result_tokens)


def generate(
    model: Qwen2 | Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    max_slots: int = 64,
    max_prefill_length: int | None = None,
    max_target_length: int | None = None,
    decode_steps: int = 8,
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
    return _Rollout(engine, _Backend(engine, backend), prompts, per_prompt).run(
        continuous=continuous, progress=progress
    )


class _Rollout:
    """Host-side scheduling of one `generate` call."""

    def __init__(self, engine: Engine, backend: _Backend, prompts, per_prompt):
        self.engine, self.backend = engine, backend
        self.prompts, self.per_prompt = prompts, per_prompt
        # Requests in order: (prompt i, sample j).
        self.requests = [(i, j) for i, sp in enumerate(per_prompt) for j in range(sp.n)]
        seeds = {sp.seed for sp in per_prompt}
        seed_key = {s: np.asarray(jax.random.PRNGKey(s)) for s in seeds}
        idx = np.asarray(self.requests, np.int32).reshape(-1, 2)
        keys = _request_keys(
            jnp.asarray(np.stack([seed_key[per_prompt[i].seed] for i, _ in self.requests])),
            jnp.asarray(idx[:, 0]),
            jnp.asarray(idx[:, 1]),
        )
        self.keys = np.asarray(keys)  # [N, 2]
        self.tokens: list[list[int]] = [[] for _ in self.requests]
        self.logprobs: list[list[float]] = [[] for _ in self.requests]
        self.reason: list[str | None] = [None] * len(self.requests)
        self._prefixes: dict[int, collections.deque[Prefix]] = {}

    def _prefix(self, r: int) -> Prefix:
        """The prefix of request r: its prompt is prefilled once, forked for all samples."""
        i, j = self.requests[r]
        if i not in self._prefixes:
            r0 = r - j  # request of sample 0 of this prompt
            sp = self.per_prompt[i]
            eng = self.engine
            reqs = [
                eng.make_request(
                    self.keys[r0 + s],
                    temperature=sp.temperature,
                    top_p=sp.top_p,
                    top_k=sp.top_k,
                    max_new_tokens=sp.max_new_tokens,
                    stop_token_ids=sp.stop_token_ids,
                )
                for s in range(sp.n)
            ]
            padded, n = eng.pad(self.prompts[i])
            base = self.backend.prefill(eng.params, padded, n, reqs[0])
            self._prefixes[i] = collections.deque(eng.fork(base, reqs))
        q = self._prefixes[i]
        prefix = q.popleft()
        if not q:
            del self._prefixes[i]
        return prefix

    def _emit(self, r: int, token: int, logprob: float, done: bool) -> bool:
        self.tokens[r].append(int(token))
        self.logprobs[r].append(float(logprob))
        if done:
            sp = self.per_prompt[self.requests[r][0]]
            self.reason[r] = "stop" if int(token) in sp.stop_token_ids else "length"
        return done

    def run(self, *, continuous: bool, progress: bool | None) -> list[list[Completion]]:
        eng, backend = self.engine, self.backend
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
        try:
            while queue or any(o is not None for o in owner):
                if continuous or all(o is None for o in owner):
                    for slot in range(slots):
                        while owner[slot] is None and queue:
                            r = queue.popleft()
                            prefix = self._prefix(r)
                            sp = self.per_prompt[self.requests[r][0]]
                            tok = int(prefix.token)
                            first_done = sp.max_new_tokens <= 1 or tok in sp.stop_token_ids
                            self._emit(r, tok, prefix.logprob, first_done)
                            if first_done:
                                bar.update(1)
                                continue
                            state = backend.insert(prefix, state, slot)
                            owner[slot] = r
                if all(o is None for o in owner):
                    continue
                refill_at = 1 if continuous and queue else slots + 1
                state, res = backend.step(eng.params, state, refill_at)
                for t in range(int(res.num_steps)):
                    for b in np.flatnonzero(res.valid[t]):
                        tok, lp, done = res.tokens[t, b], res.logprobs[t, b], res.done[t, b]
                        if self._emit(owner[b], tok, lp, done):
                            owner[b] = None
                            bar.update(1)
        finally:
            bar.close()
        out: list[list[Completion]] = [[] for _ in self.prompts]
        for r, (i, _) in enumerate(self.requests):
            out[i].append(Completion(self.tokens[r], self.logprobs[r], self.reason[r]))
        return out


def num_generated_tokens(out: list[list[Completion]]) -> int:
    """Total tokens across all completions (for throughput numbers)."""
    return sum(len(c.token_ids) for group in out for c in group)
