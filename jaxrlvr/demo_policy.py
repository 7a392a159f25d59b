"""The embedded demo's base policy: a tiny Qwen2 warm-started on noisy worked arithmetic.

GRPO needs a base policy that is right *some* of the time, as a real base model with
latent ability is: then groups of samples have mixed rewards, the policy improves, and its
entropy visibly collapses. `build_demo_policy()` makes one in about a minute on a laptop
CPU by a short supervised run on worked solutions (`jaxrlvr.data.arithmetic`) whose
intermediate results are sometimes wrong, and measures its accuracy when sampling at
temperature 1.

The result is a directory that is a complete Hugging Face checkpoint (`config.json`,
`model.safetensors`, the character-level tokenizer), plus the demo data (`train.jsonl`,
`eval.jsonl`) and `demo_policy.json` (settings, measured base accuracy, build time). It is
cached under `$JAXRLVR_CACHE` (default `~/.cache/jaxrlvr/`) in a subdirectory keyed by a
hash of the settings and `FORMAT_VERSION`; later calls reuse it. A build is written to a
temporary directory and renamed into place, so an interrupted build leaves nothing behind.

Each demo preset names its settings (`PRESET_SETTINGS`): `demo` and `demo-hard` share
one policy; `demo-fork`'s is warm-started on a mixture of two solution styles (see
`jaxrlvr.data.arithmetic.write_solution`).

CLI: `python -m jaxrlvr.demo_policy [--preset NAME] [--cache-dir DIR] [--force]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrlvr.data.arithmetic import (
    CAREFUL_MARK,
    SPECIAL_TOKENS,
    VOCAB_CHARS,
    ArithmeticProblem,
    build_demo_tokenizer,
    check_answer,
    generate_problems,
    write_demo_dataset,
    write_solution,
)
from jaxrlvr.models.checkpoint import save_hf_checkpoint
from jaxrlvr.models.qwen2 import Qwen2, Qwen2Config

FORMAT_VERSION = 1  # bump when the build procedure or the output layout changes
INFO_FILE = "demo_policy.json"
PAD_ID, BOS_ID, EOS_ID = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<bos>", "<eos>"))
_CHAR_IDS = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(VOCAB_CHARS)}
_ID_CHARS = {i: c for c, i in _CHAR_IDS.items()}

Log = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class DemoPolicySettings:
    """Everything that determines the demo base policy (and so its cache key).

    The defaults are tuned so that the build takes about a minute on a 2-core CPU and the
    policy is right on 20-60% of eval problems when sampling at temperature 1.
    """

    # model: a tiny Qwen2 with grouped-query attention; the vocabulary is the demo
    # tokenizer's (24 ids)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    # supervised warm start (AdamW, linear warm-up then cosine decay)
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    error_rate: float = 0.15  # chance that each worked step's result is off (noise)
    # the careful style (`write_solution`): this fraction of solutions starts with `(`,
    # has this error rate and free `;`/space separators; 0 = one style only
    careful_frac: float = 0.0
    careful_error_rate: float = 0.0
    # data and difficulty
    num_train: int = 4096
    num_eval: int = 256
    min_ops: int = 1
    max_ops: int = 3
    max_operand: int = 9
    # accuracy measurement: samples per eval problem at temperature 1
    eval_samples: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_train", "num_eval", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("error_rate", "careful_frac", "careful_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.max_operand < 0:
            raise ValueError(f"max_operand={self.max_operand}: must be >= 0")
        if self.max_position_embeddings < max_sequence_length(self):
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} is below the "
                f"longest sequence of this task ({max_sequence_length(self)} tokens)"
            )
        self.model_config()  # validates the head counts

    def model_config(self) -> Qwen2Config:
        """The Qwen2 architecture of the policy."""
        return Qwen2Config(
            vocab_size=len(SPECIAL_TOKENS) + len(VOCAB_CHARS),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )

    def cache_key(self) -> str:
        """A short hash of the settings and the format version (a one-style policy keeps
        the key it had before the careful style existed)."""
        fields = dataclasses.asdict(self)
        if not self.careful_frac:
            del fields["careful_frac"], fields["careful_error_rate"]
        blob = json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def max_prompt_length(s: DemoPolicySettings) -> int:
    """Most characters in a prompt (`99-99-99-99-99=` for 4 ops on operands up to 99)."""
    return (s.max_ops + 1) * len(str(s.max_operand)) + s.max_ops + 1


def max_solution_length(s: DemoPolicySettings) -> int:
    """Most characters in a worked solution, noise included (results stay within
    +-(max_ops + 1) * max_operand + 10 * max_ops)."""
    num = len(str(s.max_operand))
    res = len(str((s.max_ops + 1) * s.max_operand + 10 * s.max_ops)) + 1  # with a sign
    step = res + 1 + num + 1 + res + 1  # `r1-x=r2;`
    return int(s.careful_frac > 0) + s.max_ops * step + 1 + res  # `(`, steps, `#r`


def max_sequence_length(s: DemoPolicySettings) -> int:
    """`<bos>` + prompt + solution + `<eos>`."""
    return 1 + max_prompt_length(s) + max_solution_length(s) + 1


PRESET_SETTINGS: dict[str, DemoPolicySettings] = {
    "demo": DemoPolicySettings(),
    "demo-hard": DemoPolicySettings(),  # the demo's policy on the papers' update schedule
    # A sloppier common style plus 15% careful solutions (3% slips, free separators): a
    # rare, better strategy, which GRPO squeezes out (docs/methods.md, demo-fork).
    "demo-fork": DemoPolicySettings(error_rate=0.25, careful_frac=0.15, careful_error_rate=0.03),
}


def preset_settings(preset: str) -> DemoPolicySettings:
    """The base policy of a demo preset (`jaxrlvr.config.DEMO_PRESETS`)."""
    if preset not in PRESET_SETTINGS:
        raise ValueError(f"no demo policy for preset {preset!r}; one of {list(PRESET_SETTINGS)}")
    return PRESET_SETTINGS[preset]


def default_cache_dir() -> Path:
    """`$JAXRLVR_CACHE`, else `~/.cache/jaxrlvr`."""
    env = os.environ.get("JAXRLVR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxrlvr"


def encode(text: str) -> list[int]:
    """Character ids of `text`, as the demo tokenizer encodes it (no special tokens)."""
    return [_CHAR_IDS[c] for c in text]


def decode(ids: list[int]) -> str:
    """Text of character ids; special tokens are dropped."""
    return "".join(_ID_CHARS.get(int(i), "") for i in ids)


# --------------------------------------------------------------------------- training


def _batch(
    problems: list[ArithmeticProblem],
    rng: np.random.Generator,
    s: DemoPolicySettings,
    length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch `<bos> prompt noisy-solution <eos>` (`[B, L]` ids) and the loss
    mask `[B, L-1]` over next-token targets: 1 on the solution and `<eos>`, 0 elsewhere."""
    ids = np.full((s.batch_size, length), PAD_ID, np.int32)
    mask = np.zeros((s.batch_size, length - 1), np.float32)
    for row, i in enumerate(rng.integers(0, len(problems), size=s.batch_size)):
        p = problems[int(i)]
        prompt = [BOS_ID, *encode(p.prompt)]
        solution = write_solution(
            p,
            rng,
            s.error_rate,
            careful_frac=s.careful_frac,
            careful_error_rate=s.careful_error_rate,
        )
        seq = prompt + encode(solution) + [EOS_ID]
        ids[row, : len(seq)] = seq
        mask[row, len(prompt) - 1 : len(seq) - 1] = 1.0
    return ids, mask


def _train(
    model: Qwen2, problems: list[ArithmeticProblem], s: DemoPolicySettings, log: Log
) -> float:
    """Supervised run on noisy worked solutions; updates `model` in place and returns the
    mean loss over the last 10% of steps."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.lr, min(s.warmup_steps, s.steps), s.steps, end_value=s.lr * 0.1
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=s.weight_decay),
    )
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(ids[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([s.seed, 1])
    length = max_sequence_length(s)
    losses: list[jax.Array] = []
    start = last = t_compile = time.perf_counter()
    for i in range(s.steps):
        ids, mask = _batch(problems, rng, s, length)
        if losses:  # wait for the previous step: one step in flight, honest rates
            losses[-1].block_until_ready()
        params, opt_state, loss = step(params, opt_state, ids, mask)
        losses.append(loss)
        if i == 0:  # compiled; time the rest
            loss.block_until_ready()
            start = last = time.perf_counter()
            log(
                f"demo policy: step 1/{s.steps}  loss {float(loss):.3f}  "
                f"(compiled in {start - t_compile:.1f}s)"
            )
            continue
        now = time.perf_counter()
        if i + 1 == s.steps or now - last >= 5.0:
            last = now
            rate = i / max(now - start, 1e-9)
            log(
                f"demo policy: step {i + 1}/{s.steps}  loss {float(loss):.3f}  "
                f"{rate:.1f} steps/s  ETA {(s.steps - i - 1) / rate:.0f}s"
            )
    nnx.update(model, params)
    tail = losses[-max(1, s.steps // 10) :]
    return float(np.mean([float(x) for x in tail]))


# --------------------------------------------------------------------------- evaluation


def sample_responses(
    model: Qwen2,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    prompt_length: int | None = None,
) -> list[tuple[str, bool]]:
    """Sample one response per prompt (ancestral sampling at `temperature`, greedy at 0);
    returns (text, ended with `<eos>`) per prompt.

    A small self-contained KV-cache loop in one compiled function: the right-padded
    prompts are prefilled at slot 0, then every row decodes one token per step at its own
    position. Rows that emitted `<eos>` keep emitting padding. `prompt_length` fixes the
    padded prompt length (one compilation for several calls).
    """
    b = len(prompts)
    toks = [[BOS_ID, *encode(p)] for p in prompts]
    plen = max(len(t) for t in toks) if prompt_length is None else prompt_length
    ids = np.full((b, plen), PAD_ID, np.int32)
    for r, t in enumerate(toks):
        ids[r, : len(t)] = t
    lengths = np.array([len(t) for t in toks], np.int32)
    out = np.asarray(
        _sample_loop(
            model,
            jnp.asarray(ids),
            jnp.asarray(lengths),
            jax.random.PRNGKey(seed),
            jnp.float32(temperature),
            max_new_tokens,
        )
    )
    results = []
    for row in out:
        row = list(row)
        done = EOS_ID in row
        results.append((decode(row[: row.index(EOS_ID)] if done else row), done))
    return results


@nnx.jit(static_argnums=(5,))
def _sample_loop(model: Qwen2, ids, lengths, key, temperature, max_new_tokens: int):
    b, plen = ids.shape
    cache = model.init_cache(b, plen + max_new_tokens)
    logits, cache = model(ids, cache=cache, cache_index=jnp.zeros((b,), jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def body(t, carry):
        cache, last, pos, done, out = carry
        scaled = last / jnp.maximum(temperature, 1e-6)
        tok = jax.random.categorical(jax.random.fold_in(key, t), scaled)
        tok = jnp.where(temperature > 0, tok, jnp.argmax(last, axis=-1))
        tok = jnp.where(done, PAD_ID, tok).astype(jnp.int32)
        out = out.at[:, t].set(tok)
        done = done | (tok == EOS_ID)
        logits, cache = model(tok[:, None], cache=cache, cache_index=pos)
        return cache, logits[:, 0], pos + 1, done, out

    out = jnp.full((b, max_new_tokens), PAD_ID, jnp.int32)
    carry = (cache, last, lengths, jnp.zeros((b,), bool), out)
    return jax.lax.fori_loop(0, max_new_tokens, body, carry)[-1]


def measure_accuracy(
    model: Qwen2, rows: list[dict[str, str]], s: DemoPolicySettings, *, seed: int = 0
) -> dict[str, float]:
    """Accuracy (exact answer, ended with `<eos>`) and `<eos>` rate of `s.eval_samples`
    samples per row (`prompt`, `answer`) at temperature 1; for a two-style policy
    (`s.careful_frac > 0`) also the share of careful responses (those starting with `(`)
    and the accuracy of each style (NaN for a style never sampled)."""
    prompts = [r["prompt"] for r in rows] * s.eval_samples
    answers = [r["answer"] for r in rows] * s.eval_samples
    res = sample_responses(
        model,
        prompts,
        max_new_tokens=max_solution_length(s) + 8,
        seed=seed,
        prompt_length=max_prompt_length(s) + 1,
    )
    correct = np.array(
        [done and check_answer(text, a) for (text, done), a in zip(res, answers, strict=True)]
    )
    out = {
        "accuracy": float(np.mean(correct)),
        "eos_rate": float(np.mean([done for _, done in res])),
        "num_samples": len(res),
    }
    if s.careful_frac > 0:
        careful = np.array([text.startswith(CAREFUL_MARK) for text, _ in res])
        style_acc = lambda m: float(np.mean(correct[m])) if m.any() else float("nan")  # noqa: E731
        out |= {
            "careful_share": float(np.mean(careful)),
            "careful_accuracy": style_acc(careful),
            "common_accuracy": style_acc(~careful),
        }
    return out


# --------------------------------------------------------------------------- build / cache


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_complete(path: Path) -> bool:
    """A published build: its info file parses and the checkpoint and data are there."""
    names = ("config.json", "model.safetensors", "tokenizer.json", "train.jsonl", "eval.jsonl")
    return _read_info(path) is not None and all((path / n).is_file() for n in names)


def build_demo_policy(
    settings: DemoPolicySettings = DemoPolicySettings(),
    cache_dir: str | os.PathLike | None = None,
    log: Log = print,
    *,
    force: bool = False,
) -> Path:
    """The demo base policy directory (Hugging Face checkpoint + tokenizer + demo data +
    `demo_policy.json`), built on first use and cached by settings; `force` rebuilds."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"demo-policy-{settings.cache_key()}"
    if _is_complete(final) and not force:
        info = _read_info(final) or {}
        log(
            f"demo policy: reusing cached {final} "
            f"(base accuracy {info['base_accuracy']:.1%} at T=1)"
        )
        return final

    root.mkdir(parents=True, exist_ok=True)
    log(f"demo policy: building {final} (first use; about a minute on a laptop CPU)")
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        paths = write_demo_dataset(
            staging,
            num_train=settings.num_train,
            num_eval=settings.num_eval,
            seed=settings.seed,
            min_ops=settings.min_ops,
            max_ops=settings.max_ops,
            max_operand=settings.max_operand,
        )
        problems = generate_problems(
            settings.num_train,
            seed=settings.seed,
            min_ops=settings.min_ops,
            max_ops=settings.max_ops,
            max_operand=settings.max_operand,
        )
        rows = {
            k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()
        }

        model = Qwen2(settings.model_config(), rngs=nnx.Rngs(settings.seed))
        final_loss = _train(model, problems, settings, log)
        train_s = time.perf_counter() - t0
        metrics = measure_accuracy(model, rows["eval"], settings, seed=settings.seed + 7)
        train_metrics = measure_accuracy(
            model, rows["train"][: settings.num_eval], settings, seed=settings.seed + 8
        )

        # save_hf_checkpoint writes its own directory atomically: move its files up
        ckpt = staging / "checkpoint"
        save_hf_checkpoint(model, ckpt, tokenizer=build_demo_tokenizer())
        for f in ckpt.iterdir():
            f.rename(staging / f.name)
        ckpt.rmdir()
        build_s = time.perf_counter() - t0
        info = {
            "format_version": FORMAT_VERSION,
            "settings": dataclasses.asdict(settings),
            "base_accuracy": metrics["accuracy"],
            "eos_rate": metrics["eos_rate"],
            "eval_samples": metrics["num_samples"],
            "train_accuracy": train_metrics["accuracy"],
            "train_eos_rate": train_metrics["eos_rate"],
            **{
                f"train_{k}": v
                for k, v in train_metrics.items()
                if k.startswith(("careful", "common"))
            },
            "temperature": 1.0,
            "max_prompt_tokens": max_prompt_length(settings) + 1,
            "max_response_tokens": max_solution_length(settings) + 1,
            "final_loss": final_loss,
            "build_seconds": round(build_s, 1),
            "train_seconds": round(train_s, 1),
            "jax_backend": jax.default_backend(),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"demo policy: built in {build_s:.0f}s; base accuracy at T=1 {metrics['accuracy']:.1%} "
        f"on eval, {train_metrics['accuracy']:.1%} on train prompts (eos "
        f"{metrics['eos_rate']:.0%}, final loss {final_loss:.3f}) -> {final}"
    )
    return final


def _publish(staging: Path, final: Path) -> None:
    """Rename `staging` to `final` atomically, replacing an old `final`; if another
    process published a complete `final` first, keep theirs."""
    staging.chmod(0o755)
    old = staging.with_name(staging.name + ".old")
    if final.exists():
        with contextlib.suppress(FileNotFoundError):  # unless another process moved it
            final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        if not _is_complete(final):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m jaxrlvr.demo_policy [--preset NAME] [--cache-dir DIR] [--force]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESET_SETTINGS))
    parser.add_argument(
        "--cache-dir", default=None, help="default: $JAXRLVR_CACHE or ~/.cache/jaxrlvr"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    settings = preset_settings(args.preset)
    path = build_demo_policy(settings, cache_dir=args.cache_dir, force=args.force)
    info = _read_info(path) or {}
    print(path)
    print(f"base accuracy at T=1: {info.get('base_accuracy', float('nan')):.1%}")


if __name__ == "__main__":
    main()
