"""Forward-pass throughput: this port vs `transformers` (PyTorch) on the same weights.

Both models get the same random Qwen2.5-shaped checkpoint (optionally fewer layers), the
same batch and length, and are timed alternately in one process, so the ratio is robust to
machine load. Also reports model FLOPs utilisation when `--peak-tflops` is given.

    python benchmarks/forward.py --preset qwen2.5-0.5b --layers 4 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlvr.models import Qwen2, load_hf_checkpoint, preset, save_hf_checkpoint


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add), attention included."""
    d, f, h, k, hd = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    per_token_layer = 2 * d * (h * hd + 2 * k * hd) + 2 * h * hd * d + 3 * 2 * d * f
    attention = 2 * 2 * h * hd * seq / 2  # causal: QK^T and PV over half the keys on average
    per_token = cfg.num_hidden_layers * (per_token_layer + attention) + 2 * d * cfg.vocab_size
    return per_token * batch * seq


def time_it(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (fewer than the preset)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    args = p.parse_args()

    cfg = preset(
        args.preset, num_hidden_layers=args.layers, dtype=args.dtype, param_dtype=args.dtype
    )
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq

    with tempfile.TemporaryDirectory() as ckpt:
        save_hf_checkpoint(Qwen2(cfg, rngs=nnx.Rngs(0)), ckpt)
        model = load_hf_checkpoint(ckpt, dtype=args.dtype)
        gd, state = nnx.split(model)
        fwd = jax.jit(lambda s, x: nnx.merge(gd, s)(x))
        x = jnp.asarray(ids)
        fwd(state, x).block_until_ready()  # compile
        run_jax = lambda: fwd(state, x).block_until_ready()  # noqa: E731

        run_torch = None
        if not args.no_torch:
            import torch
            import transformers

            torch.set_num_threads(os.cpu_count())
            tdtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
            hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=tdtype).eval()
            tx = torch.tensor(ids)

            def run_torch():
                with torch.inference_mode():
                    hf(tx, use_cache=False)

            run_torch()  # warm up

    jax_t, torch_t = [], []
    for _ in range(args.iters):  # alternate, so both see the same machine load
        jax_t += time_it(run_jax, 1)
        if run_torch:
            torch_t += time_it(run_torch, 1)

    jax_tps = tokens / statistics.median(jax_t)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(
        f"model: {args.preset} shapes, {args.layers} layers, {args.dtype}; "
        f"batch {args.batch} x seq {args.seq}"
    )
    print(f"jaxrlvr      {jax_tps:12,.0f} tokens/s  (median of {args.iters})")
    if torch_t:
        torch_tps = tokens / statistics.median(torch_t)
        print(f"transformers {torch_tps:12,.0f} tokens/s")
        print(f"ratio jaxrlvr / transformers = {jax_tps / torch_tps:.2f}x")
    if args.peak_tflops:
        achieved = forward_flops(cfg, args.batch, args.seq) / statistics.median(jax_t) / 1e12
        print(f"model FLOPs: {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% MFU")


if __name__ == "__main__":
    main()
