"""Entropy methods, one module each, registered by name (`algo.intervention`).

`get(name)` gives a method's class, `from_config(config)` the active method with its
settings. Importing this package registers every method below; a new method is one
module here that defines a `Method` subclass under `@register` and is imported here.
"""

from __future__ import annotations

from typing import Any

from jaxrlvr.methods import (  # noqa: F401  (each registers itself)
    adaptive_entropy,
    clip_cov,
    entropy_bonus,
    gspo,
    kl_cov,
    pos_adv,
    steer,
)
from jaxrlvr.methods.base import REGISTRY, Method, StepContext, TokenLoss, register, setting


def names() -> tuple[str, ...]:
    """Every registered method, `none` (plain GRPO) first."""
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise KeyError(f"no entropy method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def from_config(config: Any) -> Method:
    """The method `config.algo.intervention` names, with its settings."""
    return get(config.algo.intervention).from_config(config.algo)


__all__ = [
    "REGISTRY",
    "Method",
    "StepContext",
    "TokenLoss",
    "from_config",
    "get",
    "names",
    "register",
    "setting",
]
