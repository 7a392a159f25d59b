"""Compile time of the GRPO update against model depth (scanned decoder layers).

    python benchmarks/compile_depth.py [--preset qwen2.5-math-7b] [--layers 2 28]
        [--topology v5p-8] [--tokens 1024] [--sequences 16]

Compiles `grpo.update` ahead of time (no weights: `jaxrlvr.plan`'s planner) for the
preset's architecture at each depth, on the local devices or a TPU slice, and prints the
seconds and the ratio to the shallowest. With the layers scanned, the program does not
grow with depth, so the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxrlvr import plan as plan_lib
from jaxrlvr.config import base_config
from jaxrlvr.models import preset
from jaxrlvr.sharding import MESH_AXES


def update_compile_seconds(args, layers: int, directory: Path) -> tuple[float, float]:
    """(compile seconds, temp GiB per device) of one mini-batch update at `layers` deep."""
    cfg = preset(args.preset, num_hidden_layers=layers)
    path = directory / f"layers-{layers}"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    c = base_config("qwen2.5-0.5b")  # the paper presets' numerics (bfloat16, full remat)
    c.model.path = str(path)
    c.algo.intervention = "steer"
    c.rollout.n = 8
    c.data.max_prompt_len = args.tokens // 4
    c.rollout.max_new_tokens = args.tokens - args.tokens // 4
    c.train.prompts_per_step = c.train.mini_batch_prompts = args.sequences // 8
    c.train.micro_batch_sequences = args.micro
    devices = plan_lib.slice_devices(plan_lib.parse_slice(args.topology)) if args.topology else None
    devices = devices or jax.devices()
    mesh = Mesh(np.asarray(devices).reshape(1, -1, 1), MESH_AXES)
    planner = plan_lib.Planner(c, mesh, None, log=lambda _: None)
    t0 = time.perf_counter()
    (row,) = planner.train_rows(c, only={"update"})
    return time.perf_counter() - t0, row.temp / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-math-7b")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 28])
    p.add_argument("--topology", default=None, help="a TPU slice (default: local devices)")
    p.add_argument("--tokens", type=int, default=1024, help="prompt + response tokens")
    p.add_argument("--sequences", type=int, default=16, help="sequences per mini-batch")
    p.add_argument("--micro", type=int, default=8, help="micro-batch sequences")
    args = p.parse_args()
    print(f"{args.preset}, update on {args.sequences} x {args.tokens} tokens, "
          f"{args.topology or jax.devices()[0].platform}")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            seconds, temp = update_compile_seconds(args, layers, Path(tmp))
            results[layers] = seconds
            ratio = seconds / results[args.layers[0]]
            print(f"  {layers:3d} layers: compile {seconds:6.1f} s ({ratio:.2f}x), "
                  f"temp {temp:.2f} GiB per device")  # fmt: skip


if __name__ == "__main__":
    main()
