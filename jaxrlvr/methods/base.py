"""What an entropy method is, and the registry that names them.

A method is a frozen dataclass whose fields are its settings (`config.algo.<name>.*`,
each declared once with `setting`: default, allowed values, help, docs), registered
under its name with
`@register`. The GRPO update, the learner and the config reach a method only through
the hooks below, so adding one is one module in this package (`jaxrlvr/methods/steer.py`
is the worked example in docs/methods.md). Every hook that runs on device is pure and
jit-compatible; the method's settings are static (the instance is hashable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlvr import losses
from jaxrlvr.fields import Field

Array = jax.Array
Need = Callable[[bool, str, str], None]  # need(condition, key, message)
OneOf = Callable[[str, tuple], None]  # one_of(key, choices)


def setting(default: Any, help: str, **declaration: Any) -> Any:
    """A method setting, declared once: its default, one-line help and the rest of its
    `jaxrlvr.fields.Field` (`must`, `choices`, `special`, `doc`)."""
    field = Field(default, help, **declaration)
    return dataclasses.field(default=default, metadata={"field": field})


class TokenLoss(NamedTuple):
    """Per-token policy loss `[b, R]` and the indicators the update sums into metrics."""

    loss: Array  # the weighted PPO (or replacement) loss per token
    clipped: Array  # 1 where the PPO clip bound was active
    dual_clipped: Array  # 1 where the dual clip bound was active (A < 0)
    selected: Array  # 1 where the method detached or penalised the token
    weights: Array  # per-token loss weights (1 when the method weighs nothing)


class StepContext(NamedTuple):
    """What a step's controller reads before the updates (all on device)."""

    step: Array  # [] int32: completed training steps
    epoch: Array  # [] int32: the data epoch of this step, from 0
    h_hat: Array  # [] -mean(old_logp) over the step's response tokens
    total_steps: int
    num_epochs: int


@dataclasses.dataclass(frozen=True)
class Method:
    """Plain GRPO: the PPO-clip loss, no controller, no extra metrics.

    Subclasses override what they change. The hooks, in the order a step calls them:
    `init_controller` (once, into the train state), `step_inputs` (before the updates),
    `token_loss` and `entropy_bonus` (inside every update), `finish_step` (after the
    updates, with the step's entropy), `metrics` (on the host).
    """

    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "plain GRPO (Clip-Higher is algo.eps_high > algo.eps_low)"
    settings_doc: ClassVar[str] = ""  # docs/config.md's text above the settings table
    # Whether `step_inputs` reads `ctx.h_hat`: the old log-probs are needed before the
    # step's first update, so the old-policy pass cannot be folded into it.
    reads_entropy_estimate: ClassVar[bool] = False

    @classmethod
    def from_config(cls, algo: Any) -> Method:
        """The settings in `config.algo.<name>` (none for a method without settings)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if not fields:
            return cls()
        sub = algo[cls.name]
        return cls(**{f: sub[f] for f in fields})

    @classmethod
    def fields(cls) -> dict[str, Field]:
        """Each setting's declaration, in order."""
        return {f.name: f.metadata["field"] for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: field.default for name, field in cls.fields().items()}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {name: field.help for name, field in cls.fields().items()}

    @staticmethod
    def per_group(fn, groups: int, *rows: Array, key: Array | None = None):
        """`fn(*rows)` on each of `groups` equal blocks of rows `[b, R]` (the micro-batch's
        rows on each device, with `algo.cov_scope=per_device`), outputs back to `[b, R]`;
        `key` (a PRNG key) is split so that each block draws its own selection."""
        if groups == 1:
            return fn(*rows) if key is None else fn(key, *rows)
        blocks = [x.reshape(groups, -1, *x.shape[1:]) for x in rows]
        if key is None:
            out = jax.vmap(fn)(*blocks)
        else:
            out = jax.vmap(fn)(jax.random.split(key, groups), *blocks)
        return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)

    def check_settings(self, need: Need) -> None:
        """Report each setting outside its declared values."""
        for name, field in self.fields().items():
            problem = field.problem(getattr(self, name))
            need(problem is None, f"algo.{self.name}.{name}", problem or "")

    def validate(self, config: Any, need: Need, one_of: OneOf) -> None:
        """Report what the declarations cannot: settings that must agree with each other
        or with the rest of the config (`need(ok, key, message)`)."""

    def inert(self, config: Any, num_epochs: int | None) -> list[str]:
        """Warnings for settings that cannot act in this run."""
        return []

    # -- on device

    def init_controller(self) -> Any:
        """The controller state carried (and checkpointed) in the train state."""
        return ()

    def step_inputs(self, controller: Any, ctx: StepContext) -> dict[str, Array]:
        """Scalars fixed for all updates of the step."""
        return {}

    def finish_step(self, controller: Any, entropy: Array, inputs: dict[str, Array]) -> Any:
        """The controller after the step (the train state keeps the old one if the
        entropy is not finite)."""
        return controller

    def token_loss(self, key: Array, logp: Array, mb: Any, adv: Array, inputs, s) -> TokenLoss:
        """The per-token loss of micro-batch `mb` (`adv` broadcast to `[b, R]`)."""
        return self.weighted_ppo(logp, mb, adv, s, jnp.ones_like(logp), jnp.zeros_like(logp))

    def entropy_bonus(self, inputs: dict[str, Array]) -> Array | None:
        """An entropy-bonus coefficient added to `algo.entropy_coef`, or None (no term)."""
        return None

    # -- on the host

    def metrics(self, token: dict[str, float], inputs: dict, controller: Any) -> dict[str, float]:
        """The method's metrics from the update's token means (`intervention_frac`,
        `weight_mean`, `weight_min`), the step inputs and the controller after the step."""
        return {}

    # -- shared

    @staticmethod
    def weighted_ppo(logp, mb, adv, s, weights, selected) -> TokenLoss:
        """The PPO-clip loss with detached per-token `weights`."""
        terms = losses.ppo_token_loss(logp, mb.old_logp, adv, s.eps_low, s.eps_high, s.dual_clip)
        weights = jax.lax.stop_gradient(weights)
        return TokenLoss(terms.loss * weights, terms.clipped, terms.dual_clipped, selected, weights)


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `algo.intervention=<cls.name>`."""
    if cls.name in REGISTRY:
        raise ValueError(f"an entropy method named {cls.name!r} is registered already")
    REGISTRY[cls.name] = cls
    return cls


register(Method)
