"""The planner's predictions against a measured run of the same config, on this machine.

    python benchmarks/plan_calibration.py [--layers=2] [--steps=5] [--mean_response_len=N]

Builds a random checkpoint with Qwen2.5-0.5B's structure (width 896, 14 / 2 heads, MLP
4864) cut to `--layers` layers and the demo tokenizer's vocabulary, plans GRPO on it with
`jaxrlvr.plan` on one local device (the roofline of this CPU, measured), trains the same
config for `--steps` steps, and prints predicted against measured: the step time (and
its rollout and update parts, after the first step, which compiles) and the bytes the
run keeps on the device (the train state, the sampler's weights and its KV cache).
Run it with nothing else on the machine; `docs/scaling.md` has its output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = ""  # one local device

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxrlvr import plan as plan_lib  # noqa: E402
from jaxrlvr.config import base_config  # noqa: E402
from jaxrlvr.data.arithmetic import save_demo_tokenizer  # noqa: E402
from jaxrlvr.models import Qwen2, preset, save_hf_checkpoint  # noqa: E402
from jaxrlvr.runtime.metrics import read_metrics  # noqa: E402
from jaxrlvr.train import Trainer  # noqa: E402

SAMPLER = ("sampler_sync", "prefill", "insert", "generate")


def make_checkpoint(path: Path, layers: int) -> None:
    tok = save_demo_tokenizer(path)
    cfg = preset("qwen2.5-0.5b").replace(
        vocab_size=len(tok), num_hidden_layers=layers, bos_token_id=1, eos_token_id=2
    )
    save_hf_checkpoint(Qwen2(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b)} for a in range(9) for b in range(9)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(path: Path, workdir: Path, steps: int):
    c = base_config("qwen2.5-0.5b")
    c.model.path, c.data.train_files, c.workdir = str(path), str(path / "train.jsonl"), str(workdir)
    c.model.dtype, c.model.remat = "float32", "none"  # this CPU's fast path
    c.data.prompt_template, c.data.answer_field, c.reward.name = "raw", "answer", "demo"
    c.data.max_prompt_len, c.rollout.max_new_tokens = 16, 64
    c.rollout.n, c.rollout.max_slots = 4, 16
    c.train.prompts_per_step, c.train.mini_batch_prompts = 8, 4
    c.train.micro_batch_sequences, c.train.steps = 16, steps
    c.train.eval_every, c.train.checkpoint_every, c.train.progress = 0, 0, False
    c.optim.warmup_steps, c.mesh.shape = 0, (1, 1, 1)
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        make_checkpoint(path, args.layers)
        c = config(path, Path(tmp) / "run", args.steps)
        trainer, kept_at = Trainer(c), {}
        save = Trainer._save

        def measured_save(self, step, *args, **kw):  # the device arrays before a checkpoint
            gc.collect()
            kept_at.setdefault("before", sum(x.nbytes for x in jax.live_arrays()))
            save(self, step, *args, **kw)
            self.checkpointer.wait()
            gc.collect()
            kept_at.setdefault("after", sum(x.nbytes for x in jax.live_arrays()))

        Trainer._save = measured_save
        trainer.run()
        Trainer._save = save
        rows = read_metrics(c.workdir)[1:]  # the first step compiles
        measured = {
            k: float(np.mean([r[k] for r in rows]))
            for k in ("time_step", "time_rollout", "time_update")
        }
        mean_len = float(np.mean([r["response_length_mean"] for r in rows]))
        result = plan_lib.plan(
            config(path, Path(tmp) / "plan", args.steps),
            log=lambda _: None,
            mean_response_len=mean_len,
        )
    t = result["time"]
    by_name = {p["name"]: p for p in t["programs"]}
    predicted_rollout = sum(by_name[n]["step_s"] for n in SAMPLER if n in by_name)
    predicted_update = t["step_s"] - predicted_rollout
    generate = next(p for p in result["programs"] if p["name"] == "generate")
    planned_kept = generate["arguments"] + generate["resident"]
    ratio = lambda p, m: f"| {p:.3f} | {m:.3f} | {p / m:.2f} |"  # noqa: E731
    lines = [
        f"{t['chip']['source']}; {args.layers} layers, mean response {mean_len:.1f} tokens",
        "",
        "| quantity | predicted | measured | predicted / measured |",
        "|---|---|---|---|",
        "| step s " + ratio(t["step_s"], measured["time_step"]),
        "| rollout s " + ratio(predicted_rollout, measured["time_rollout"]),
        "| update s " + ratio(predicted_update, measured["time_update"]),
        "| device MiB kept while sampling "
        + ratio(planned_kept / 2**20, kept_at["before"] / 2**20),
        "| the same after a checkpoint save "
        + ratio(planned_kept / 2**20, kept_at["after"] / 2**20),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
