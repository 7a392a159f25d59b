"""Rollout collection: sample groups of responses, score them, and build the update batch.

`RolloutCollector` is the host-side half of a training step: it draws prompt batches,
samples `rollout.n` responses per prompt with the current policy, scores them with the
verifiable reward, keeps informative groups (DAPO dynamic sampling), computes the group
advantages and pads everything into `grpo.Batch` arrays. In-loop evaluation samples and
scores through the same `generate` and `score`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrlvr import losses
from jaxrlvr.rewards import ERROR, TIMEOUT, RewardFn, get_reward_fn
from jaxrlvr.rewards.overlong import overlong_penalty
from jaxrlvr.rl import grpo
from jaxrlvr.runtime import distributed
from jaxrlvr.sampling import Engine, SamplingParams, generate


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus the chat end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def pad_token_id(tokenizer) -> int:
    """The id that pads rollout rows: the tokenizer's pad token, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def make_reward(config: ml_collections.ConfigDict) -> RewardFn:
    """The verifiable reward of `config.reward` (the math checker with its limits)."""
    r = config.reward
    if r.name != "math":
        return get_reward_fn(r.name)
    return get_reward_fn(
        "math",
        timeout_s=r.timeout_s,
        num_workers=r.num_workers or None,
        batch_timeout_s=r.batch_timeout_s or None,
    )


def derive_seed(*parts: int) -> int:
    """A sampling seed from integers, stable across processes (unlike `hash`)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


class Scores(NamedTuple):
    """Rewards of a batch of completions and the counts of failed checks."""

    rewards: np.ndarray  # float32 [N]
    errors: int  # checker exceptions and dead workers
    timeouts: int  # answers over the per-answer limit or left when the batch limit ran out


class RolloutCollector:
    """Samples, scores and batches the rollouts of one step (see module docstring)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        engine: Engine,
        tokenizer,
        reward_fn: RewardFn,
        stop_ids: tuple[int, ...],
        pad_id: int,
    ):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.stop_ids = stop_ids
        self.pad_id = pad_id

    def generate(self, prompts: list[list[int]], n: int, seed: int):
        """`n` sampled completions for each prompt with the engine's current weights."""
        r = self.config.rollout
        params = SamplingParams(
            n=n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed,
        )
        return generate(
            self.engine,
            prompts,
            params,
            backend="native" if r.backend == "engine" else "jetstream",
            # None: the bar only on a terminal (a log file gets no carriage-return frames)
            progress=None if self.config.train.progress and len(prompts) * n >= 1024 else False,
        )

    def decode(self, token_ids) -> str:
        """A response's text as the reward sees it (special tokens dropped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def score(self, completions, answers: list[str], n: int) -> Scores:
        """Rewards of every completion (answer i for completions i*n ... i*n+n-1); with
        several processes each scores its share and the shares are gathered."""
        mine = distributed.share(len(completions))
        texts = [self.decode(c.token_ids) for c in completions[mine]]
        result = self.reward_fn.score_batch(texts, [a for a in answers for _ in range(n)][mine])
        counts = result.counts()
        failures = np.asarray([counts[ERROR], counts[TIMEOUT]], np.int64)
        rewards = distributed.gather(np.asarray(result.rewards, np.float32), len(completions))
        failures = distributed.gather(failures[None], jax.process_count()).sum(axis=0)
        return Scores(rewards, int(failures[0]), int(failures[1]))

    def collect(self, step: int, data_iter) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rollouts, rewards and advantages of one step (with DAPO dynamic sampling)."""
        c = self.config
        n, want = c.rollout.n, c.train.prompts_per_step
        kept: list[tuple] = []  # (prompt, completions, rewards) per group
        spare: list[tuple] = []
        all_rewards, errors, timeouts, epochs = [], 0, 0, []
        for attempt in range(c.algo.dynamic_sampling_max_batches if c.algo.dynamic_sampling else 1):
            batch = next(data_iter)
            epochs.append(batch.epoch)
            out = self.generate(batch.input_ids, n, derive_seed(c.seed, step, attempt))
            scores = self.score([comp for group in out for comp in group], batch.answers, n)
            all_rewards.append(scores.rewards)
            errors, timeouts = errors + scores.errors, timeouts + scores.timeouts
            for i, prompt in enumerate(batch.input_ids):
                g = (prompt, out[i], scores.rewards[i * n : (i + 1) * n])
                informative = not c.algo.dynamic_sampling or np.ptp(g[2]) > 0
                (kept if informative else spare).append(g)
            if len(kept) >= want:
                break
        groups = (kept + spare)[:want]  # top up with uninformative groups if sampling ran dry
        rewards = np.concatenate([g[2] for g in groups])
        comps = [comp for g in groups for comp in g[1]]
        lengths = np.array([len(comp.token_ids) for comp in comps])
        r = c.reward  # DAPO's overlong shaping acts on the advantages, not on which groups count
        penalty = overlong_penalty(
            lengths, c.rollout.max_new_tokens, r.overlong_buffer, r.overlong_penalty
        )
        shaped = rewards + penalty
        adv = np.asarray(losses.grpo_advantages(jnp.asarray(shaped), n, c.algo.std_normalize))
        arrays = grpo.rollout_batch(
            [g[0] for g in groups for _ in range(n)],
            [comp.token_ids for comp in comps],
            [comp.logprobs for comp in comps],
            adv,
            prompt_len=c.data.max_prompt_len,
            response_len=c.rollout.max_new_tokens,
            pad_id=self.pad_id,
        )
        sampled = np.concatenate(all_rewards)
        info = {
            "reward_mean": float(sampled.mean()),
            "accuracy": float((sampled >= 1.0).mean()),
            "reward_errors": errors,
            "reward_timeouts": timeouts,
            "response_length_mean": float(lengths.mean()),
            "response_length_max": int(lengths.max()),
            "truncated_frac": float(np.mean([comp.finish_reason == "length" for comp in comps])),
            "generated_tokens": int(lengths.sum()),
            "epoch": int(max(epochs)),
        }
        if r.overlong_buffer:
            info["overlong_penalty_mean"] = float(penalty.mean())
            info["overlong_penalized_frac"] = float(np.mean(penalty < 0))
        if c.algo.dynamic_sampling:
            info["dynamic_sampling_batches"] = len(all_rewards)
            info["dynamic_sampling_kept_frac"] = float(min(len(kept), want) / want)
        return arrays, info
