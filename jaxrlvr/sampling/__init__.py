"""Sampling: a JetStream-style engine and the rollout driver with continuous batching.

`generate(model, prompts, SamplingParams(...), max_slots=...)` is the entry point; see
`docs/sampling.md`. The JetStream adapter lives in `jaxrlvr.sampling.jetstream` (optional
extra) and is not imported here.
"""

from jaxrlvr.sampling.engine import (
    DecodeState,
    Engine,
    Prefix,
    RequestParams,
    StepResult,
)
from jaxrlvr.sampling.rollout import Completion, SamplingParams, generate, num_generated_tokens
from jaxrlvr.sampling.sample import sample_tokens

__all__ = [
    "Completion",
    "DecodeState",
    "Engine",
    "Prefix",
    "RequestParams",
    "SamplingParams",
    "StepResult",
    "generate",
    "num_generated_tokens",
    "sample_tokens",
]
