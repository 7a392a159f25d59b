"""A JetStream-style decoding engine for `Qwen2`: prefill, insert, generate over slots.

The engine follows the contract of `jetstream.engine.engine_api.Engine` (see
`docs/sampling.md`; `jaxrlvr.sampling.jetstream` wraps it as a real subclass):

- `prefill` runs one prompt, right-padded to a power-of-two bucket, into a `[1, P]`
  prefix KV cache and samples its first token.
- `insert` copies a prefix into one slot of the decode state, a preallocated `[B, S]` KV
  cache sharded on the mesh (B = `max_concurrent_decodes` slots, S =
  `max_target_length` positions; cache slot index == token position).
- `generate` advances every slot by one token, each at its own position. `generate_steps`
  runs up to `decode_steps` of them in one compiled loop (one host round trip), stopping
  early once `refill_at` slots have finished so that a driver can refill them promptly.

Beyond the contract, `prefill_batch` runs R prompts of one length bucket in one call (R
itself bucketed) and samples the first token of each of their requests (n per prompt: a
GRPO group), and `insert_batch` puts any k of those requests into k slots in one call.

The hot functions are pure functions of `(graphdef, params, ...)`, jit-compiled once per
model architecture and shape (shared by every engine over an equal `graphdef`) with the
decode state donated. The engine keeps its own copy of the weights in the model's compute
dtype, laid out by `SAMPLER_AXIS_RULES` (model parallel, nothing gathered per decode step);
`update_params` refreshes it from the trainer's parameters once per step. Every request
carries its own PRNG key; the key of its t-th generated token is `fold_in(key, t)`, so
samples do not depend on which slot, batch or schedule they ran in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlvr.errors import ConfigError
from jaxrlvr.models.qwen2 import CACHE_AXES, KVCache, Qwen2, as_dtype, init_cache
from jaxrlvr.sampling.sample import sample_tokens
from jaxrlvr.sharding import (
    SAMPLER_AXIS_RULES,
    axis_rules,
    make_mesh,
    named_sharding,
    replicate,
    state_shardings,
)

Array = jax.Array
Params = Any  # an nnx.State of the model's parameters


class RequestParams(NamedTuple):
    """Per-request decoding settings (host numpy scalars or device arrays)."""

    key: Any  # [2] uint32 raw PRNG key of the request
    temperature: Any  # [] float32; <= 0 is greedy
    top_p: Any  # [] float32 in (0, 1]
    top_k: Any  # [] int32; 0 = off
    max_new_tokens: Any  # [] int32
    stop_ids: Any  # [NS] int32, padded with -1


class Prefix(NamedTuple):
    """The result of `prefill`: a prompt's KV cache and its first sampled token.

    `prefill_batch` returns one of R prompts with n requests each: cache `[L, R, P, K, Dh]`,
    logits `[R, V]`, length `[R]`, token and logprob `[R, n]`, request fields `[R, n, ...]`.
    """

    cache: KVCache  # [L, 1, P, K, Dh]
    logits: Array  # [V] float32: next-token logits after the prompt
    length: Any  # [] int32: true prompt length (cache slot of the first generated token)
    token: Any  # [] int32: first generated token
    logprob: Any  # [] float32: its log-prob (temperature-scaled, untruncated)
    request: RequestParams


class DecodeState(NamedTuple):
    """Everything `generate` transforms; every field has the slot axis B first."""

    cache: KVCache  # [L, B, S, K, Dh]
    tokens: Array  # [B] int32: last generated token (the next step's input)
    pos: Array  # [B] int32: cache slot of `tokens`
    num_generated: Array  # [B] int32: tokens generated so far by the slot's request
    active: Array  # [B] bool: the slot holds an unfinished request
    logprobs: Array  # [B] float32: log-prob of `tokens`
    keys: Array  # [B, 2] uint32: request PRNG keys
    temperature: Array  # [B] float32
    top_p: Array  # [B] float32
    top_k: Array  # [B] int32
    max_new_tokens: Array  # [B] int32
    stop_ids: Array  # [B, NS] int32


class StepResult(NamedTuple):
    """Tokens of `num_steps` decoding steps; row i of each array is step i."""

    tokens: Array  # [k, B] int32
    logprobs: Array  # [k, B] float32
    valid: Array  # [k, B] bool: the slot produced a token at this step
    done: Array  # [k, B] bool: ...and that token finished its request
    num_steps: Array  # [] int32: steps actually run (<= k)


def _check(cond: bool, field: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r}: {why}")


def validate_sampling(
    temperature: float, top_p: float, top_k: int, max_new_tokens: int, prefix: str = ""
) -> None:
    """Raise a `ValueError` naming the field for an out-of-range decoding setting."""
    t = float(temperature)
    _check(math.isfinite(t) and t >= 0, f"{prefix}temperature", temperature, "must be >= 0")
    p = float(top_p)
    _check(0.0 < p <= 1.0, f"{prefix}top_p", top_p, "must be in (0, 1]")
    _check(
        isinstance(top_k, (int, np.integer)) and top_k >= 0,
        f"{prefix}top_k",
        top_k,
        "must be an int >= 0 (0 = off)",
    )
    _check(
        isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1,
        f"{prefix}max_new_tokens",
        max_new_tokens,
        "must be an int >= 1",
    )


DECODE_STEPS = 8  # decode steps per `generate_steps` call (per host round trip), by default
MAX_PREFILL_BATCH = 16  # prompts per `prefill_batch` call, by default


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """The powers of two from `smallest` (rounded up) below `largest`, then `largest`: the
    sizes an axis is padded to, so that a function compiles once per bucket."""
    out, b = [], min(next_power_of_two(smallest), largest)
    while b < largest:
        out.append(b)
        b *= 2
    return (*out, largest)


def fit_bucket(sizes: Sequence[int], n: int) -> int:
    """The smallest of `sizes` (ascending, as `buckets` makes them) that holds `n`."""
    return next(b for b in sizes if b >= n)


# --------------------------------------------------------------------------- pure functions


def _in_stop(tokens: Array, stop_ids: Array) -> Array:
    """tokens `[...]`, stop_ids `[..., NS]` (-1 padded) -> `[...]` bool."""
    return jnp.any((tokens[..., None] == stop_ids) & (stop_ids >= 0), axis=-1)


def _prefill_batch(graphdef, params, tokens, lengths, requests: RequestParams) -> Prefix:
    """R prompts in one call -> a `Prefix` of R rows with every request's first token.

    tokens `[R, P]` right-padded, lengths `[R]`, requests fields `[R, n, ...]`: request
    (i, j) draws its first token from prompt i's logits with the key `fold_in(key, 0)`.
    """
    model: Qwen2 = nnx.merge(graphdef, params)
    r, p = tokens.shape
    n = requests.temperature.shape[1]
    cache = init_cache(model.config, r, p)
    hidden, cache = model.hidden_states(
        tokens, cache=cache, cache_index=jnp.zeros((r,), jnp.int32)
    )  # [R, P, D]
    last = hidden[jnp.arange(r), lengths - 1]  # [R, D]
    logits = model.logits(last[:, None])[:, 0]  # [R, V]
    flat = jax.tree.map(lambda x: x.reshape(r * n, *x.shape[2:]), requests)  # [R n, ...]
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(flat.key, 0)
    # A gather, not `jnp.repeat`: XLA:CPU takes minutes to compile the sampler after a
    # repeat for some shapes (e.g. [4, 24] -> [8, 24]).
    per_request = logits[jnp.arange(r * n) // n]  # [R n, V]
    tok, lp = sample_tokens(per_request, keys, flat.temperature, flat.top_p, flat.top_k)
    # What the host reads back is whole on every device (and so on every process).
    first = replicate((tok.reshape(r, n), lp.reshape(r, n)))
    return Prefix(cache, logits, lengths, *first, requests)


def _prefill(graphdef, params, tokens, true_length, request):
    """tokens `[1, P]` right-padded, true_length `[]` -> `Prefix` (first token sampled)."""
    one = _prefill_batch(
        graphdef, params, tokens, true_length[None], jax.tree.map(lambda x: x[None, None], request)
    )
    token, logprob = one.token[0, 0], one.logprob[0, 0]
    return Prefix(one.cache, one.logits[0], true_length, token, logprob, request)


def _first_tokens(logits, requests: RequestParams):
    """First tokens of n requests sharing one prefix: logits `[V]`, fields `[n, ...]`."""
    n = requests.key.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(requests.key, 0)
    tokens, logprobs = sample_tokens(
        jnp.broadcast_to(logits, (n, logits.shape[0])),
        keys,
        requests.temperature,
        requests.top_p,
        requests.top_k,
    )
    return replicate(tokens), replicate(logprobs)


def _insert_batch(prefix: Prefix, state: DecodeState, slots, rows, samples) -> DecodeState:
    """Put request (rows[i], samples[i]) of a batched `prefix` into slot slots[i].

    slots, rows, samples `[K]`; slots >= B are padding, placed last, and write nothing.
    The cache rows are copied one by one into the donated cache (no `[L, K, P, K, Dh]`
    gather is built: a prompt row may fill several slots).
    """
    b, s = state.tokens.shape[0], state.cache.max_length

    def copy(i, cache):
        def put(c, p):  # c [L, B, S, K, Dh], p [L, R, P, K, Dh]
            row = jax.lax.dynamic_slice_in_dim(p, rows[i], 1, axis=1)
            return jax.lax.dynamic_update_slice(c, row.astype(c.dtype), (0, slots[i], 0, 0, 0))

        return KVCache(put(cache.k, prefix.cache.k), put(cache.v, prefix.cache.v))

    cache = jax.lax.fori_loop(0, jnp.sum(slots < b), copy, state.cache)

    def pick(x):  # [R, n, ...] -> [K, ...]
        return x[rows, samples]

    r = jax.tree.map(pick, prefix.request)
    token, length = pick(prefix.token), prefix.length[rows]
    # Finished at its first token: a stop token, a budget of one, or no room to feed it.
    done = _in_stop(token, r.stop_ids) | (r.max_new_tokens <= 1) | (length >= s)

    def set_(arr, value):
        return arr.at[slots].set(jnp.asarray(value, arr.dtype), mode="drop")

    return DecodeState(
        cache=cache,
        tokens=set_(state.tokens, token),
        pos=set_(state.pos, length),
        num_generated=set_(state.num_generated, 1),
        active=set_(state.active, ~done),
        logprobs=set_(state.logprobs, pick(prefix.logprob)),
        keys=set_(state.keys, r.key),
        temperature=set_(state.temperature, r.temperature),
        top_p=set_(state.top_p, r.top_p),
        top_k=set_(state.top_k, r.top_k),
        max_new_tokens=set_(state.max_new_tokens, r.max_new_tokens),
        stop_ids=set_(state.stop_ids, r.stop_ids),
    )


def _insert(prefix: Prefix, state: DecodeState, slot) -> DecodeState:
    """Copy `prefix` (one prompt, one request) into slot `slot` (a traced int)."""
    rows = prefix._replace(
        length=jnp.reshape(prefix.length, (1,)),
        token=jnp.reshape(prefix.token, (1, 1)),
        logprob=jnp.reshape(prefix.logprob, (1, 1)),
        request=jax.tree.map(lambda x: jnp.asarray(x)[None, None], prefix.request),
    )
    zero = jnp.zeros((1,), jnp.int32)
    return _insert_batch(rows, state, jnp.reshape(slot, (1,)), zero, zero)


def _decode_step(model: Qwen2, state: DecodeState) -> tuple[DecodeState, tuple[Array, ...]]:
    """One token for every slot; inactive slots compute but change nothing."""
    s = state.cache.max_length
    logits, cache = model(
        state.tokens[:, None], cache=state.cache, cache_index=state.pos
    )  # [B, 1, V]
    keys = jax.vmap(jax.random.fold_in)(state.keys, state.num_generated)  # [B, 2]
    tok, lp = sample_tokens(logits[:, 0], keys, state.temperature, state.top_p, state.top_k)
    active = state.active
    num_generated = state.num_generated + active.astype(jnp.int32)
    new_pos = state.pos + 1  # cache slot of the new token, fed at the next step
    done = active & (
        _in_stop(tok, state.stop_ids) | (num_generated >= state.max_new_tokens) | (new_pos >= s)
    )
    new = state._replace(
        cache=cache,
        tokens=jnp.where(active, tok, state.tokens),
        pos=jnp.where(active, jnp.minimum(new_pos, s - 1), state.pos),
        num_generated=num_generated,
        active=active & ~done,
        logprobs=jnp.where(active, lp, state.logprobs),
    )
    return new, (tok, lp, active, done)


def _generate(graphdef, params, state: DecodeState, refill_at, num_steps: int):
    """Up to `num_steps` decode steps; stops early when no slot is active or once
    `refill_at` slots have finished. Returns `(state, StepResult)`."""
    model: Qwen2 = nnx.merge(graphdef, params)
    b = state.tokens.shape[0]
    out = StepResult(
        tokens=jnp.zeros((num_steps, b), jnp.int32),
        logprobs=jnp.zeros((num_steps, b), jnp.float32),
        valid=jnp.zeros((num_steps, b), bool),
        done=jnp.zeros((num_steps, b), bool),
        num_steps=jnp.zeros((), jnp.int32),
    )

    def cond(carry):
        i, st, _, freed = carry
        return (i < num_steps) & jnp.any(st.active) & (freed < refill_at)

    def body(carry):
        i, st, res, freed = carry
        st, (tok, lp, valid, done) = _decode_step(model, st)
        res = res._replace(
            tokens=res.tokens.at[i].set(tok),
            logprobs=res.logprobs.at[i].set(lp),
            valid=res.valid.at[i].set(valid),
            done=res.done.at[i].set(done),
        )
        return i + 1, st, res, freed + jnp.sum(done, dtype=jnp.int32)

    i, state, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, jnp.int32(0)))
    return state, replicate(out._replace(num_steps=i))  # read by the host: whole everywhere


def _init_state(cfg, b: int, s: int, ns: int, cache_dtype) -> DecodeState:
    z = functools.partial(jnp.zeros, (b,))
    return DecodeState(
        cache=init_cache(cfg, b, s, cache_dtype),
        tokens=z(jnp.int32),
        pos=z(jnp.int32),
        num_generated=z(jnp.int32),
        active=z(bool),
        logprobs=z(jnp.float32),
        keys=jnp.zeros((b, 2), jnp.uint32),
        temperature=z(jnp.float32),
        top_p=jnp.ones((b,), jnp.float32),
        top_k=z(jnp.int32),
        max_new_tokens=z(jnp.int32),
        stop_ids=jnp.full((b, ns), -1, jnp.int32),
    )


@functools.lru_cache(maxsize=16)
def _init_jit(cfg, b: int, s: int, ns: int, cache_dtype, shardings: DecodeState):
    """The jitted constructor of an empty decode state placed on `shardings`."""
    return jax.jit(
        functools.partial(_init_state, cfg, b, s, ns, cache_dtype), out_shardings=shardings
    )


class Programs(NamedTuple):
    """The engine's jitted programs (see `programs`)."""

    prefill: Any
    prefill_batch: Any
    first_tokens: Any
    insert: Any
    insert_batch: Any
    generate: Any


def _sampler_rules(fn):
    """`fn`, traced with the sampler's logical-axis rules."""

    def wrapped(*args):
        with axis_rules(SAMPLER_AXIS_RULES):
            return fn(*args)

    base = fn.func if isinstance(fn, functools.partial) else fn
    wrapped.__name__ = wrapped.__qualname__ = base.__name__.lstrip("_")  # e.g. jit(generate)
    wrapped.__doc__ = base.__doc__
    return wrapped


@functools.lru_cache(maxsize=16)
def programs(graphdef) -> Programs:
    """The engine's jitted programs for one model architecture, shared by all its engines
    (and compiled ahead of time by `jaxrlvr.plan`)."""
    return Programs(
        prefill=jax.jit(_sampler_rules(functools.partial(_prefill, graphdef))),
        prefill_batch=jax.jit(_sampler_rules(functools.partial(_prefill_batch, graphdef))),
        first_tokens=jax.jit(_first_tokens),
        insert=jax.jit(_sampler_rules(_insert), donate_argnums=(1,)),
        insert_batch=jax.jit(_sampler_rules(_insert_batch), donate_argnums=(1,)),
        generate=jax.jit(
            _sampler_rules(functools.partial(_generate, graphdef)),
            static_argnums=(3,),
            donate_argnums=(1,),
        ),
    )


def cast_params(params: Params, dtype) -> Params:
    """Floating parameters cast to `dtype`."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


# --------------------------------------------------------------------------- engine


class Engine:
    """Decoding engine over `Qwen2` (JetStream `Engine` contract; see module docstring).

    Args:
      model: the `Qwen2` whose architecture (and initial parameters) the engine serves.
      max_concurrent_decodes: number of decode slots B.
      max_prefill_length: longest prompt; prompts are padded to power-of-two buckets
        between `min_prefill_bucket` and this.
      max_target_length: KV-cache positions S per slot (prompt + generated tokens);
        default `max_prefill_length + 1024`.
      decode_steps: decode steps per `generate_steps` call (per host round trip).
      min_prefill_bucket: the smallest prefill bucket.
      max_prefill_batch: most prompts per `prefill_batch` call; calls are padded to a
        power-of-two number of rows up to this.
      max_stop_tokens: capacity of the per-slot stop-token list.
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      param_dtype: dtype of the engine's copy of the weights (default: the model's compute
        dtype).
      mesh: device mesh for parameters and KV cache (default: all devices on 'fsdp').
    """

    def __init__(
        self,
        model: Qwen2,
        *,
        max_concurrent_decodes: int,
        max_prefill_length: int,
        max_target_length: int | None = None,
        decode_steps: int = DECODE_STEPS,
        min_prefill_bucket: int = 16,
        max_prefill_batch: int = MAX_PREFILL_BATCH,
        max_stop_tokens: int = 8,
        cache_dtype: Any = None,
        param_dtype: Any = None,
        mesh: Mesh | None = None,
    ):
        def positive(name, v):
            _check(isinstance(v, (int, np.integer)) and v >= 1, name, v, "must be an int >= 1")

        positive("max_concurrent_decodes", max_concurrent_decodes)
        positive("max_prefill_length", max_prefill_length)
        positive("decode_steps", decode_steps)
        positive("min_prefill_bucket", min_prefill_bucket)
        positive("max_prefill_batch", max_prefill_batch)
        positive("max_stop_tokens", max_stop_tokens)
        if max_target_length is None:
            max_target_length = max_prefill_length + 1024
        _check(
            isinstance(max_target_length, (int, np.integer))
            and max_target_length > max_prefill_length,
            "max_target_length",
            max_target_length,
            f"must be an int > max_prefill_length={max_prefill_length}",
        )
        self.config = model.config
        self._graphdef, params = nnx.split(model)
        self._fns = programs(self._graphdef)
        self._mesh = mesh = make_mesh() if mesh is None else mesh
        self._slots = int(max_concurrent_decodes)
        self._max_prefill = int(max_prefill_length)
        self._max_target = int(max_target_length)
        self.decode_steps = int(decode_steps)
        self.max_stop_tokens = int(max_stop_tokens)
        self._cache_dtype = cache_dtype
        self.max_prefill_batch = int(max_prefill_batch)
        self.prefill_buckets = buckets(min_prefill_bucket, self._max_prefill)  # prompt lengths
        self.row_buckets = buckets(1, self.max_prefill_batch)  # prompts per prefill_batch
        self._insert_buckets = buckets(1, self._slots)  # requests per insert_batch
        self.param_dtype = as_dtype(model.config.dtype if param_dtype is None else param_dtype)
        self._param_shardings = sampler_param_shardings(params, self._mesh)
        self._param_avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        # Cast and lay out the trainer's parameters in one program (the engine's copy).
        self._cast = jax.jit(
            functools.partial(cast_params, dtype=self.param_dtype),
            out_shardings=self._param_shardings,
        )
        _, self._state_shardings = decode_state_layout(
            self.config,
            self._slots,
            self._max_target,
            self.max_stop_tokens,
            cache_dtype,
            self._mesh,
        )
        self.params: Params = self.update_params(params)

    # -- JetStream Engine contract ---------------------------------------------------

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_target_length(self) -> int:
        return self._max_target

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def load_params(self, *args, **kwargs) -> Params:
        """The engine's parameters, placed on its mesh (`update_params` replaces them)."""
        return self.params

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        """An empty decode state (all slots free), sharded on the mesh."""
        fn = _init_jit(
            self.config,
            self._slots,
            self._max_target,
            self.max_stop_tokens,
            self._cache_dtype,
            self._state_shardings,
        )
        with jax.set_mesh(self._mesh):
            return fn()

    def prefill(
        self,
        *,
        params: Params,
        padded_tokens: Any,
        true_length: int,
        existing_prefix: Prefix | None = None,
        request: RequestParams | None = None,
    ) -> Prefix:
        """Run one prompt (`[P]` right-padded to a bucket) and sample its first token.

        `request` sets the decoding of this request (default: greedy, no stop tokens, the
        whole cache as budget); see `make_request`.
        """
        if existing_prefix is not None:
            raise NotImplementedError("prefill with an existing_prefix is not supported")
        tokens = np.asarray(padded_tokens, np.int32).reshape(1, -1)
        p = tokens.shape[1]
        self._check_bucket(p)
        _check(0 < int(true_length) <= p, "true_length", true_length, f"must be in [1, {p}]")
        request = self.make_request() if request is None else request
        with jax.set_mesh(self._mesh):
            return self._fns.prefill(params, tokens, np.int32(true_length), request)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Put a prefix (its cache, first token and request) into slot `slot`.

        The decode state is donated: use the returned one.
        """
        _check(0 <= int(slot) < self._slots, "slot", slot, f"must be in [0, {self._slots})")
        with jax.set_mesh(self._mesh):
            return self._fns.insert(prefix, decode_state, np.int32(slot))

    def generate(self, params: Params, decode_state: DecodeState) -> tuple[DecodeState, StepResult]:
        """One decoding step for every slot (the JetStream `generate`); state donated."""
        return self.generate_steps(params, decode_state, num_steps=1)

    def free_resource(self, slot: int) -> None:
        """Nothing to free: slots are overwritten by the next `insert`."""
        return None

    def get_prefix_destination_sharding(self) -> Any:
        """None: prefill and generate run on the same engine and mesh, nothing moves."""
        return None

    # -- beyond the contract ---------------------------------------------------------

    def prefill_batch(
        self,
        *,
        params: Params,
        padded_tokens: Any,
        true_lengths: Any,
        requests: Sequence[Sequence[RequestParams]] | None = None,
    ) -> Prefix:
        """Run R prompts of one bucket in one call and sample their requests' first tokens.

        `padded_tokens` is `[R, P]` (right-padded, R a row bucket: see `pad_batch`).
        `requests[i]` lists the requests that continue prompt i (e.g. its n samples), each
        from `make_request`; missing rows and entries are greedy fillers. Returns a `Prefix`
        of R rows (shapes in its docstring), n = the most requests of a row rounded up to a
        power of two.
        """
        tokens = np.asarray(padded_tokens, np.int32)
        _check(tokens.ndim == 2, "padded_tokens", tokens.shape, "must be [rows, length]")
        r, p = tokens.shape
        self._check_bucket(p)
        if r not in self.row_buckets:
            raise ValueError(
                f"padded_tokens has {r} rows; expected one of the row buckets "
                f"{self.row_buckets} (use Engine.pad_batch)"
            )
        lengths = np.asarray(true_lengths, np.int32)
        _check(
            lengths.shape == (r,) and bool(np.all((lengths >= 1) & (lengths <= p))),
            "true_lengths",
            true_lengths,
            f"must be {r} lengths in [1, {p}]",
        )
        rows = [] if requests is None else [list(q) for q in requests]
        _check(len(rows) <= r, "requests", len(rows), f"must list at most {r} rows")
        n = next_power_of_two(max(map(len, rows), default=1))
        fill = self.make_request()
        grid = [q + [fill] * (n - len(q)) for q in rows] + [[fill] * n] * (r - len(rows))
        flat = [q for row in grid for q in row]  # [R n] requests, row-major
        stacked = RequestParams(
            *(np.stack(f).reshape(r, n, *np.shape(f[0])) for f in zip(*flat, strict=True))
        )
        with jax.set_mesh(self._mesh):
            return self._fns.prefill_batch(params, tokens, lengths, stacked)

    def insert_batch(
        self,
        prefix: Prefix,
        decode_state: DecodeState,
        slots: Sequence[int],
        rows: Sequence[int],
        samples: Sequence[int] | None = None,
    ) -> DecodeState:
        """Put request (`rows[i]`, `samples[i]`) of a `prefill_batch` prefix into slot
        `slots[i]` for every i, in one call (default sample 0). Slots must be distinct.

        The decode state is donated: use the returned one.
        """
        slots, rows = np.asarray(slots, np.int32), np.asarray(rows, np.int32)
        samples = np.zeros_like(rows) if samples is None else np.asarray(samples, np.int32)
        _check(
            slots.ndim == 1 and slots.shape == rows.shape == samples.shape,
            "slots",
            slots,
            "slots, rows and samples must be lists of ints of one length",
        )
        k = slots.size
        if k == 0:
            return decode_state
        r, n = np.shape(prefix.token)
        _check(
            bool(np.all((slots >= 0) & (slots < self._slots))) and len(set(slots.tolist())) == k,
            "slots",
            slots,
            f"must be distinct, in [0, {self._slots})",
        )
        _check(bool(np.all((rows >= 0) & (rows < r))), "rows", rows, f"must be in [0, {r})")
        _check(
            bool(np.all((samples >= 0) & (samples < n))), "samples", samples, f"must be in [0, {n})"
        )
        size = fit_bucket(self._insert_buckets, k)

        def pad(x, value):  # [k] -> [size]
            return np.pad(x, (0, size - k), constant_values=value)

        with jax.set_mesh(self._mesh):
            return self._fns.insert_batch(
                prefix, decode_state, pad(slots, self._slots), pad(rows, 0), pad(samples, 0)
            )

    def generate_steps(
        self,
        params: Params,
        decode_state: DecodeState,
        num_steps: int | None = None,
        refill_at: int | None = None,
    ) -> tuple[DecodeState, StepResult]:
        """Up to `num_steps` (default `decode_steps`) steps in one compiled loop.

        Returns early when no slot is active, or once `refill_at` slots have finished
        (default: never early). The decode state is donated.
        """
        k = self.decode_steps if num_steps is None else int(num_steps)
        refill = self._slots + 1 if refill_at is None else int(refill_at)
        with jax.set_mesh(self._mesh):
            return self._fns.generate(params, decode_state, np.int32(refill), k)

    def fork(self, prefix: Prefix, requests: Sequence[RequestParams]) -> list[Prefix]:
        """One prefix per request, all sharing `prefix`'s cache, each with its own first
        token sampled from the prefix logits under that request (n samples, one prefill).

        First tokens and log-probs come back as host numpy scalars.
        """
        if not requests:
            return []
        stacked = RequestParams(*(np.stack(f) for f in zip(*requests, strict=True)))
        with jax.set_mesh(self._mesh):
            toks, lps = jax.device_get(self._fns.first_tokens(prefix.logits, stacked))
        return [
            prefix._replace(token=np.int32(t), logprob=np.float32(lp), request=r)
            for t, lp, r in zip(toks, lps, requests, strict=True)
        ]

    def update_params(self, params: Params) -> Params:
        """Install new parameters (e.g. from the trainer); returns the engine's copy.

        `params` is an NNX `State` of the model (or the module itself). The copy is cast to
        `param_dtype` and laid out by the sampler's rules in one compiled program; from
        another mesh (a trainer on other devices), the parameters are first moved onto the
        engine's. Shapes must match the model's, so nothing is recompiled.
        """
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        if jax.tree.structure(params) != jax.tree.structure(self._param_avals):
            raise ValueError("update_params: parameter tree does not match the engine's model")
        for new, old in zip(
            jax.tree.leaves(params), jax.tree.leaves(self._param_avals), strict=True
        ):
            if new.shape != old.shape:
                raise ValueError(
                    f"update_params: a parameter of shape {tuple(new.shape)} {new.dtype} where "
                    f"the model has {tuple(old.shape)} {old.dtype}"
                )
        devices = set(self._mesh.devices.flat)
        if any(
            not isinstance(x, jax.Array) or x.sharding.device_set != devices
            for x in jax.tree.leaves(params)
        ):
            params = jax.tree.map(_place, params, self._param_shardings)
        cast = self._cast(params)
        if self.param_dtype == jnp.float16:  # float16's range ends at 65504
            self._check_range(params, cast)
        self.params = cast
        return self.params

    def _check_range(self, params: Params, cast: Params) -> None:
        """Refuse a float16 copy in which a finite parameter became infinite."""
        finite = jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), (params, cast))
        for (path, was), now in zip(
            jax.tree_util.tree_leaves_with_path(finite[0]), jax.tree.leaves(finite[1]), strict=True
        ):
            if was and not now:
                raise ConfigError(
                    f"config.rollout.dtype='float16': parameter {jax.tree_util.keystr(path)} "
                    "has values beyond float16's range (|x| > 65504); use bfloat16 or float32"
                )

    def make_request(
        self,
        key: Any = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> RequestParams:
        """Validated host-side `RequestParams` (`key`: a raw `[2]` uint32 key or an int seed)."""
        budget = self._max_target if max_new_tokens is None else max_new_tokens
        validate_sampling(temperature, top_p, top_k, budget)
        stop = list(stop_token_ids)
        if len(stop) > self.max_stop_tokens:
            raise ValueError(
                f"stop_token_ids has {len(stop)} ids; this engine holds at most "
                f"max_stop_tokens={self.max_stop_tokens}"
            )
        if key is None:
            key = 0
        if isinstance(key, (int, np.integer)):
            key = jax.random.PRNGKey(int(key))
        ids = np.full((self.max_stop_tokens,), -1, np.int32)
        ids[: len(stop)] = stop
        return RequestParams(
            key=np.asarray(key, np.uint32).reshape(2),
            temperature=np.float32(temperature),
            top_p=np.float32(top_p),
            top_k=np.int32(top_k),
            max_new_tokens=np.int32(min(budget, np.iinfo(np.int32).max)),
            stop_ids=ids,
        )

    def bucket(self, length: int) -> int:
        """The prefill bucket for a prompt of `length` tokens."""
        _check(
            0 < length <= self._max_prefill,
            "prompt length",
            length,
            f"must be in [1, max_prefill_length={self._max_prefill}]",
        )
        return fit_bucket(self.prefill_buckets, length)

    def pad(self, prompt: Sequence[int]) -> tuple[np.ndarray, int]:
        """Right-pad a prompt to its bucket: `([P] int32, true_length)`."""
        n = len(prompt)
        out = np.zeros((self.bucket(n),), np.int32)
        out[:n] = prompt
        return out, n

    def pad_batch(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts as `prefill_batch` takes them: `([R, P] int32, true lengths [R])`, right-
        padded to the bucket of the longest, with one-token filler rows up to a row bucket."""
        _check(
            0 < len(prompts) <= self.max_prefill_batch,
            "number of prompts",
            len(prompts),
            f"must be in [1, max_prefill_batch={self.max_prefill_batch}]",
        )
        rows = fit_bucket(self.row_buckets, len(prompts))
        tokens = np.zeros((rows, self.bucket(max(map(len, prompts)))), np.int32)
        lengths = np.ones((rows,), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
            lengths[i] = len(prompt)
        return tokens, lengths

    # -- internals -------------------------------------------------------------------

    def _check_bucket(self, length: int) -> None:
        if length not in self.prefill_buckets:
            raise ValueError(
                f"padded_tokens has length {length}; expected one of the prefill buckets "
                f"{self.prefill_buckets} (use Engine.pad)"
            )


def decode_state_layout(
    cfg, slots: int, max_target: int, max_stop_tokens: int, cache_dtype, mesh: Mesh
) -> tuple[DecodeState, DecodeState]:
    """The decode state as shapes and dtypes, and its shardings: the KV cache and every
    per-slot array split on the slot axis, by the sampler's rules."""
    abstract = jax.eval_shape(
        functools.partial(_init_state, cfg, slots, max_target, max_stop_tokens, cache_dtype)
    )

    def spec(path, x):
        names = ("cache_batch",) + (None,) * (x.ndim - 1)  # per-slot arrays: like the cache
        if path and getattr(path[0], "name", None) == "cache":
            names = CACHE_AXES
        return named_sharding(mesh, names, x.shape, SAMPLER_AXIS_RULES)

    return abstract, jax.tree_util.tree_map_with_path(spec, abstract)


def sampler_param_shardings(params: Params, mesh: Mesh) -> Params:
    """Where the engine keeps its copy of the weights (`SAMPLER_AXIS_RULES`)."""
    return state_shardings(params, mesh, SAMPLER_AXIS_RULES)


def _place(x: Array, sharding) -> Array:
    """`x` on `sharding`, without a copy when it is already there."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    return jax.device_put(x, sharding)
