"""Precision of the sampler: rollout.dtype float32 / bfloat16 / float16, each without and
with token-level truncated importance sampling (algo.rollout_is=token, cap 2), the
learner in float32 throughout (docs/methods.md#sampler-precision).

    python -m jaxrlvr.sweep --sweep=sweeps/precision.py --root=runs/precision
    python -m jaxrlvr.report runs/precision --out=runs/precision/report

ARG: a preset (`demo` by default; `demo-hard` for the papers' update schedule),
`method=NAME` (a config file name, default grpo), `seeds=N` (default 3).
"""

from jaxrlvr.sweep import axis, product, seeds, sweep_arg


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    config = f"configs/{options.get('method', 'grpo')}.py" + (
        f":{preset}" if preset != "demo" else ""
    )
    points = product(
        axis("config", [config]),
        axis("rollout.dtype", ["float32", "bfloat16", "float16"]),
        axis("algo.rollout_is", ["none", "token"]),
    )
    return product(points, seeds(int(options.get("seeds", 3))))
