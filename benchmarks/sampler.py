"""Sampler throughput: this engine (continuous / static batching) vs `transformers.generate`.

    python benchmarks/sampler.py                 # CPU default: Qwen2.5-0.5B shapes, 2 layers
    python benchmarks/sampler.py --decode-only --preset qwen2.5-1.5b --layers 0 \
        --dtype bfloat16 --slots 256            # accelerator: decode tokens/s and roofline

Rollout benchmark (default). One random-weight model, the same weights in JAX and PyTorch
(written with `save_hf_checkpoint`, read with `Qwen2ForCausalLM.from_pretrained`), the same
prompts (all `--prompt-len` tokens), sampling at temperature 1 (top-p 1, top-k off), and
`--slots` sequences in flight for every system. Three systems:

  engine-continuous  `jaxrlvr.sampling.generate`, a freed slot is refilled at once
  engine-static      the same engine with `continuous=False`: a batch of `--slots` requests
                     runs until its longest sequence ends before the next batch starts
  transformers       `Qwen2ForCausalLM.generate(do_sample=True)`, batches of `--slots`
                     requests (PyTorch CPU, float32)

Two workloads, each with `--requests` requests:

  equal     every response is exactly `--max-new` tokens long
  longtail  round(`--long-frac` x requests) responses are `--max-new` long, the rest
            draw a length uniformly from [`--short-min`, `--short-max`]; the long ones sit
            at random positions of the request order (seeded)

Response lengths are forced per request, independently of the random weights: in the
engine with a per-request `SamplingParams.max_new_tokens`, in `transformers` with a
per-row `StoppingCriteria` (a finished row keeps its place in the batch until the whole
batch ends, as with EOS). Throughput counts the generated tokens of the forced lengths
only, over the wall time of the whole rollout (prefill included), after a warm-up run of
every engine system on every workload that compiles every shape. Each engine row also
counts its calls: prefill and insert calls, decode blocks (`generate_steps`) and host
syncs (blocking `jax.device_get` fetches).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import tempfile
import time

import jax
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (0 = all of the preset)")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--long-frac", type=float, default=0.125)
    p.add_argument("--short-min", type=int, default=4)
    p.add_argument("--short-max", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=8, help="engine steps per host trip")
    p.add_argument("--max-prefill-batch", type=int, default=16, help="prompts per prefill call")
    p.add_argument("--workloads", default="equal,longtail")
    p.add_argument("--systems", default="engine-continuous,engine-static,transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per system; best is kept")
    p.add_argument("--torch-threads", type=int, default=0, help="0 = PyTorch default")
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="time the decode loop alone with every slot busy (accelerator numbers)",
    )
    p.add_argument("--context", type=int, default=512, help="--decode-only: tokens in cache")
    p.add_argument("--steps", type=int, default=64, help="--decode-only: timed steps")
    p.add_argument("--peak-gbps", type=float, default=0.0, help="memory bandwidth for roofline")
    return p.parse_args(argv)


def build_model(args):
    from flax import nnx

    from jaxrlvr.models import Qwen2, preset

    over = dict(dtype=args.dtype, param_dtype=args.dtype)
    if args.layers:
        over["num_hidden_layers"] = args.layers
    cfg = preset(args.preset, **over)
    return Qwen2(cfg, rngs=nnx.Rngs(args.seed))


def workload_lengths(name: str, args) -> list[int]:
    rng = np.random.default_rng(args.seed)
    if name == "equal":
        return [args.max_new] * args.requests
    if name == "longtail":
        k = round(args.long_frac * args.requests)
        short = rng.integers(args.short_min, args.short_max + 1, args.requests - k)
        return rng.permutation(np.concatenate([np.full(k, args.max_new), short])).tolist()
    raise ValueError(f"unknown workload {name!r}")


# --------------------------------------------------------------------------- systems


ENGINE_CALLS = ("prefill", "prefill_batch", "insert", "insert_batch", "generate_steps")


@contextlib.contextmanager
def counting_calls(engine):
    """Count the engine's calls by name, and the host's blocking fetches as 'device_get'."""
    counts: collections.Counter = collections.Counter()

    def counted(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    device_get = jax.device_get
    for name in ENGINE_CALLS:
        setattr(engine, name, counted(name, getattr(engine, name)))
    jax.device_get = counted("device_get", device_get)
    try:
        yield counts
    finally:
        jax.device_get = device_get
        for name in ENGINE_CALLS:
            delattr(engine, name)


def run_engine(engine, prompts, lengths, continuous: bool, seed: int):
    """Returns (generated tokens, seconds, call counts)."""
    from jaxrlvr.sampling import SamplingParams, generate, num_generated_tokens

    params = [SamplingParams(temperature=1.0, max_new_tokens=n, seed=seed) for n in lengths]
    with counting_calls(engine) as counts:
        t0 = time.perf_counter()
        out = generate(engine, prompts, params, continuous=continuous, progress=False)
        dt = time.perf_counter() - t0
    got = num_generated_tokens(out)
    assert got == sum(lengths), (got, sum(lengths))
    return got, dt, counts


def describe_calls(counts) -> str:
    prefill = counts["prefill"] + counts["prefill_batch"]
    insert = counts["insert"] + counts["insert_batch"]
    return (
        f"prefill {prefill}, insert {insert}, decode blocks {counts['generate_steps']}, "
        f"host syncs {counts['device_get']}"
    )


def run_transformers(hf, prompts, lengths, slots: int, seed: int) -> tuple[int, float]:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ForcedLengths(StoppingCriteria):
        def __init__(self, prompt_len: int, lengths: list[int]):
            self.prompt_len, self.lengths = prompt_len, torch.tensor(lengths)

        def __call__(self, input_ids, scores, **kw):
            return (input_ids.shape[1] - self.prompt_len) >= self.lengths

    torch.manual_seed(seed)
    total, t0 = 0, time.perf_counter()
    for start in range(0, len(prompts), slots):
        batch = torch.tensor(prompts[start : start + slots])
        lens = lengths[start : start + slots]
        with torch.no_grad():
            out = hf.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max(lens),
                min_new_tokens=0,
                stopping_criteria=StoppingCriteriaList([ForcedLengths(batch.shape[1], lens)]),
                pad_token_id=0,
                eos_token_id=None,
            )
        assert out.shape[1] - batch.shape[1] == max(lens)
        total += sum(lens)
    return total, time.perf_counter() - t0


def rollout_benchmark(args) -> None:
    from jaxrlvr.sampling import Engine

    model = build_model(args)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, (args.requests, args.prompt_len)).tolist()
    systems = args.systems.split(",")
    engine = Engine(
        model,
        max_concurrent_decodes=args.slots,
        max_prefill_length=args.prompt_len,
        max_target_length=args.prompt_len + args.max_new,
        decode_steps=args.decode_steps,
        max_prefill_batch=args.max_prefill_batch,
    )
    hf = None
    if "transformers" in systems:
        import torch
        import transformers

        from jaxrlvr.models import save_hf_checkpoint

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(model, os.path.join(tmp, "m"))
            hf = transformers.Qwen2ForCausalLM.from_pretrained(
                os.path.join(tmp, "m"), dtype=torch.float32
            ).eval()

    print(
        f"model {args.preset} x {cfg.num_hidden_layers} layers ({args.dtype}), "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cpus; {args.requests} requests, "
        f"{args.slots} slots, prompt {args.prompt_len}, max_new {args.max_new}, "
        f"max_prefill_batch {args.max_prefill_batch}"
    )
    # Warm-up: compile every shape of each schedule (and let PyTorch settle).
    for wl in args.workloads.split(","):
        for system, continuous in (("engine-continuous", True), ("engine-static", False)):
            if system in systems:
                run_engine(engine, prompts, workload_lengths(wl, args), continuous, args.seed)
    if hf is not None:
        warm = [min(4, args.max_new)] * args.slots
        run_transformers(hf, prompts[: args.slots], warm, args.slots, args.seed)

    rows = []
    for wl in args.workloads.split(","):
        lengths = workload_lengths(wl, args)
        best: dict[str, float] = {}
        for _ in range(args.repeats):  # round robin, so load changes hit every system
            for system in systems:
                calls = ""
                if system in ("engine-continuous", "engine-static"):
                    continuous = system == "engine-continuous"
                    n, dt, counts = run_engine(engine, prompts, lengths, continuous, args.seed)
                    calls = f" ({describe_calls(counts)})"
                elif system == "transformers":
                    n, dt = run_transformers(hf, prompts, lengths, args.slots, args.seed)
                else:
                    raise ValueError(f"unknown system {system!r}")
                best[system] = max(best.get(system, 0.0), n / dt)
                print(
                    f"  {wl:9s} {system:18s} {n:6d} tokens {dt:8.2f} s {n / dt:9.1f} tok/s{calls}"
                )
        rows.append((wl, lengths, best))

    print()
    print("| workload | mean len | " + " | ".join(f"{s} tok/s" for s in systems) + " | ratios |")
    print("|---|---|" + "---|" * len(systems) + "---|")
    for wl, lengths, tps in rows:
        pairs = [
            ("engine-continuous", "transformers"),
            ("engine-continuous", "engine-static"),
            ("engine-static", "transformers"),
        ]
        ratios = [
            f"{a.removeprefix('engine-')}/{b.removeprefix('engine-')} {tps[a] / tps[b]:.2f}x"
            for a, b in pairs
            if a in tps and b in tps
        ]
        cells = " | ".join(f"{tps[s]:.1f}" for s in systems)
        print(f"| {wl} | {np.mean(lengths):.1f} | {cells} | {'; '.join(ratios)} |")


# --------------------------------------------------------------------------- decode only


def decode_benchmark(args) -> None:
    """Every slot busy at `--context` tokens; time `--steps` decode steps."""
    import jax.numpy as jnp

    from jaxrlvr.sampling import Engine

    model = build_model(args)
    cfg = model.config
    s = args.context + args.steps + args.decode_steps + 1
    engine = Engine(
        model,
        max_concurrent_decodes=args.slots,
        max_prefill_length=16,
        max_target_length=s,
        decode_steps=args.decode_steps,
    )
    state = engine.init_decode_state()
    b = args.slots
    # Fill every slot as if its prompt had `context` tokens (cache contents do not matter
    # for timing): active, sampling at T = 1, with a budget beyond the timed steps.
    state = state._replace(
        pos=jnp.full((b,), args.context, jnp.int32),
        active=jnp.ones((b,), bool),
        temperature=jnp.ones((b,), jnp.float32),
        max_new_tokens=jnp.full((b,), 10**6, jnp.int32),
        keys=jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), jnp.arange(b)),
    )
    state = jax.device_put(state, engine._state_shardings)
    state, _ = engine.generate_steps(engine.params, state)  # compile
    jax.block_until_ready(state)
    calls = max(1, args.steps // args.decode_steps)
    t0 = time.perf_counter()
    for _ in range(calls):
        state, res = engine.generate_steps(engine.params, state)
    jax.block_until_ready(res)
    dt = (time.perf_counter() - t0) / (calls * args.decode_steps)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(engine.params))
    ctx = args.context + args.steps / 2  # mean cache length over the run
    kv_bytes = 2 * cfg.num_hidden_layers * b * ctx * cfg.num_key_value_heads * cfg.head_dim
    kv_bytes *= itemsize
    # The attention reads every cache position (masked), i.e. the whole preallocated cache.
    kv_alloc = 2 * cfg.num_hidden_layers * b * s * cfg.num_key_value_heads * cfg.head_dim
    kv_alloc *= itemsize
    print(
        f"decode {args.preset} x {cfg.num_hidden_layers} layers ({args.dtype}) on "
        f"{jax.devices()[0].device_kind}: batch {b}, context {args.context}: "
        f"{dt * 1e3:.2f} ms/step, {b / dt:,.0f} tokens/s"
    )
    print(
        f"bytes/step: params {param_bytes / 1e9:.2f} GB + KV (used) {kv_bytes / 1e9:.2f} GB "
        f"(allocated, read by the masked attention: {kv_alloc / 1e9:.2f} GB)"
    )
    if args.peak_gbps:
        need = (param_bytes + kv_bytes) / dt / 1e9
        frac = need / args.peak_gbps
        print(f"achieved {need:,.0f} GB/s = {frac:.1%} of {args.peak_gbps:,.0f} GB/s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.decode_only:
        decode_benchmark(args)
    else:
        rollout_benchmark(args)


if __name__ == "__main__":
    main()
