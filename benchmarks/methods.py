"""Every entropy intervention on the embedded demo, side by side.

Runs `python -m jaxrlvr.train` once per method (same seed, data, steps and base policy),
then prints a Markdown table: final entropy (mean of the last `--window` steps), final
training reward over the same window, final eval Avg@k, and wall time.

    python benchmarks/methods.py                   # all methods, 100 demo steps each
    python benchmarks/methods.py --methods grpo,steer --steps 40
    python benchmarks/methods.py --methods GRPO,Clip-Cov --seeds 3   # mean ± std over seeds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METHODS = {  # label -> config argument
    "GRPO": "configs/grpo.py",
    "Clip-Higher": "configs/clip_higher.py",
    "Entropy bonus": "configs/entropy_bonus.py",
    "Adaptive entropy": "configs/adaptive_entropy.py",
    "Clip-Cov": "configs/clip_cov.py",
    "KL-Cov": "configs/kl_cov.py",
    "Pos-Adv (entropy-guided)": "configs/pos_adv.py:entropy_guided",
    "Pos-Adv (stage)": "configs/pos_adv.py:stage",
    "Rand-Pos-Clip": "configs/pos_adv.py:rand_pos_clip",
    "Adv>=0 only": "configs/pos_adv.py:adv_pos_only",
    "Adv<=0 only": "configs/pos_adv.py:adv_neg_only",
    "STEER": "configs/steer.py",
    "STEER (linear)": "configs/steer.py:linear",
}


def summarize(workdir: str, window: int) -> dict[str, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if r["step"] > 0]
    last = steps[-window:]
    evals = [r for r in rows if any(k.startswith("eval_avg@") for k in r)]
    eval_key = next(k for k in evals[-1] if k.startswith("eval_avg@")) if evals else None
    return {
        "entropy_start": float(np.mean([r["entropy"] for r in steps[:window]])),
        "entropy_final": float(np.mean([r["entropy"] for r in last])),
        "reward_final": float(np.mean([r["reward_mean"] for r in last])),
        "eval_base": evals[0][eval_key] if evals else float("nan"),
        "eval_final": evals[-1][eval_key] if evals else float("nan"),
        "steps": steps[-1]["step"],
    }


def _run(label: str, config: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One training run; returns its summary and wall time."""
    name = label.replace(" ", "_").replace("/", "_")
    workdir = os.path.join(args.workdir, name if seed == 0 else f"{name}-seed{seed}")
    cmd = [
        sys.executable, "-m", "jaxrlvr.train", f"--config={config}",
        f"--config.workdir={workdir}", f"--config.seed={seed}", "--config.train.progress=False",
    ]  # fmt: skip
    if args.steps:
        cmd.append(f"--config.train.steps={args.steps}")
    cmd += [f"--config.{kv}" for kv in args.set]
    print(f"[{label}, seed {seed}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{label} (seed {seed}) failed")
    r = summarize(workdir, args.window) | {"wall_s": wall}
    print(
        f"  entropy {r['entropy_start']:.3f} -> {r['entropy_final']:.3f}, "
        f"reward {r['reward_final']:.3f}, eval {r['eval_base']:.3f} -> {r['eval_final']:.3f}, "
        f"{wall:.0f}s",
        flush=True,
    )
    return r


def _cell(values: list[float]) -> str:
    """`mean` for one seed, `mean ± std` (sample std over seeds) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="all", help="comma-separated labels or config args")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seeds", type=int, default=1, help="runs per method (config.seed 0..n-1)")
    p.add_argument("--window", type=int, default=10, help="steps averaged for final values")
    p.add_argument("--workdir", default="runs/methods")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set train.mini_batch_prompts=8",
    )  # fmt: skip
    args = p.parse_args()
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds}: must be >= 1")

    chosen = METHODS if args.methods == "all" else {
        m: METHODS.get(m, m) for m in args.methods.split(",")
    }  # fmt: skip
    results = {
        label: {
            "config": config,
            "runs": [_run(label, config, seed, args) for seed in range(args.seeds)],
        }
        for label, config in chosen.items()
    }

    seeds = "" if args.seeds == 1 else f" (mean ± std over {args.seeds} seeds)"
    print(
        f"\n| method | config | final entropy{seeds} | final reward "
        "| eval Avg@k (base -> final) | wall |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        col = {key: [run[key] for run in r["runs"]] for key in r["runs"][0]}  # key -> per seed
        print(
            f"| {label} | `{r['config']}` | {_cell(col['entropy_final'])} "
            f"| {_cell(col['reward_final'])} | {_cell(col['eval_base'])} -> "
            f"{_cell(col['eval_final'])} | {np.mean(col['wall_s']):.0f} s |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
