"""`jetstream.engine.engine_api.Engine` over the jaxrlvr `Engine` (the `jetstream` extra).

`JetStreamAdapter(engine)` is a real subclass of JetStream's abstract `Engine`, so
JetStream tooling (its orchestrator, benchmarks) can drive a `Qwen2`; `generate` returns
JetStream `ResultTokens`. The rollout driver runs through it with
`generate(..., backend="jetstream")` and produces the same tokens as the native path.

This module imports JetStream and is never imported by `jaxrlvr.sampling` itself.
JetStream's PyPI release 0.2.2 imports TensorFlow (through seqio) from
`jetstream.engine.engine_api`, and its orchestrator (`Driver`) calls `jax.tree_map`, which
current JAX removed; the driver here therefore replaces JetStream's `Driver`.

`ResultTokens.data` is `[B, 5]` int32 per generate step: token, valid, length (tokens
generated so far), done (the token finished its request), and the token's float32
log-prob bit-cast to int32 (columns beyond JetStream's three are ours).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jetstream.engine import engine_api, tokenizer_pb2
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "jaxrlvr.sampling.jetstream needs JetStream: pip install 'jaxrlvr[jetstream]' "
        f"(google-jetstream==0.2.2); import failed with: {e}"
    ) from e

from jaxrlvr.sampling.engine import DecodeState, Engine, Prefix, RequestParams, StepResult

# JetStream 0.2.2: prefill(...) -> Prefix. Later releases: -> (Prefix, ResultTokens).
_PREFILL_RETURNS_TOKENS = "sampler" in inspect.signature(engine_api.Engine.prefill).parameters

_COLUMNS = 5  # token, valid, length, done, logprob bits


@jax.jit
def _pack(tokens, valid, lengths, done, logprobs):
    """`[B]` each -> `[B, 5]` int32 ResultTokens data."""
    bits = jax.lax.bitcast_convert_type(logprobs.astype(jnp.float32), jnp.int32)
    cols = (tokens, valid, lengths, done, bits)
    return jnp.stack([c.astype(jnp.int32) for c in cols], axis=-1)


def _result_tokens(data) -> engine_api.ResultTokens:
    return engine_api.ResultTokens(
        data=data, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3), samples_per_slot=1
    )


class JetStreamAdapter(engine_api.Engine):
    """A JetStream `Engine` backed by a jaxrlvr `Engine` (same compiled functions)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # -- the abstract API --------------------------------------------------------------

    def prefill(
        self,
        *,
        params: Any,
        existing_prefix: Prefix | None = None,
        padded_tokens: Any,
        true_length: int,
        sampler: Any = None,
        request: RequestParams | None = None,
    ):
        """JetStream prefill; `request` (ours) sets the decoding of the request."""
        if sampler is not None:
            raise NotImplementedError("custom samplers are not supported; pass request=")
        prefix = self.prefill_prefix(
            params=params,
            existing_prefix=existing_prefix,
            padded_tokens=padded_tokens,
            true_length=true_length,
            request=request,
        )
        if not _PREFILL_RETURNS_TOKENS:
            return prefix
        data = _pack(
            prefix.token[None],
            jnp.ones((1,), bool),
            jnp.ones((1,), jnp.int32),
            jnp.zeros((1,), bool),
            prefix.logprob[None],
        )
        return prefix, _result_tokens(data)

    def generate(
        self, params: Any, decode_state: DecodeState, sampler: Any = None
    ) -> tuple[DecodeState, engine_api.ResultTokens]:
        if sampler is not None:
            raise NotImplementedError("custom samplers are not supported")
        state, res = self.engine.generate(params, decode_state)
        data = _pack(res.tokens[0], res.valid[0], state.num_generated, res.done[0], res.logprobs[0])
        return state, _result_tokens(data)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        return self.engine.insert(prefix, decode_state, slot)

    def free_resource(self, slot: int) -> Any:
        return self.engine.free_resource(slot)

    def load_params(self, *args, **kwargs) -> Any:
        return self.engine.load_params(*args, **kwargs)

    def get_prefix_destination_sharding(self) -> Any:
        return self.engine.get_prefix_destination_sharding()

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        """Empty: the engine works on token ids; tokenization happens outside it."""
        return tokenizer_pb2.TokenizerParameters()

    def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> Any:
        raise NotImplementedError("the jaxrlvr engine has no tokenizer: it takes token ids")

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        return self.engine.init_decode_state(*args, **kwargs)

    @property
    def max_concurrent_decodes(self) -> int:
        return self.engine.max_concurrent_decodes

    @property
    def samples_per_slot(self) -> int:
        return self.engine.samples_per_slot

    @property
    def max_prefill_length(self) -> int:
        return self.engine.max_prefill_length

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.engine.mesh

    @property
    def colocated_cpus(self) -> None:
        return None

    # -- helpers for the rollout driver --------------------------------------------------

    def prefill_prefix(self, **kwargs) -> Prefix:
        """`prefill` returning only the `Prefix`, whatever the JetStream version."""
        return self.engine.prefill(**kwargs)

    @staticmethod
    def step_result(result: engine_api.ResultTokens) -> StepResult:
        """Host `StepResult` (one step) from this adapter's `ResultTokens`."""
        data = np.asarray(result.data)  # [B, 5]
        return StepResult(
            tokens=data[None, :, 0],
            logprobs=np.ascontiguousarray(data[:, 4]).view(np.float32)[None],
            valid=data[None, :, 1].astype(bool),
            done=data[None, :, 3].astype(bool),
            num_steps=1,
        )
