"""The methods comparison: every entropy intervention under the same seed, data and steps.

    python -m jaxrlvr.sweep --sweep=sweeps/methods.py --root=runs/methods
    python -m jaxrlvr.sweep --sweep=sweeps/methods.py:seeds=3 --root=runs/methods-3seeds
    python -m jaxrlvr.sweep --sweep=sweeps/methods.py:all --root=runs/methods-all
    python -m jaxrlvr.sweep --sweep=sweeps/methods.py:demo-hard,seeds=3 --root=runs/methods-hard \
        --baseline=grpo --window=20
    python -m jaxrlvr.sweep --sweep=sweeps/methods.py:demo-fork,seeds=3 --root=runs/methods-fork \
        --baseline=grpo --window=20

ARG: a preset (`demo` by default), `seeds=N` (seeds 0..N-1 per method), `all` (also the
variants: pos_adv schedules and ablations, linear STEER), `methods=a+b` (config
arguments, e.g. `methods=grpo+steer`).
"""

from jaxrlvr.sweep import axis, product, seeds, sweep_arg

# The eight method files, one point each (their own defaults).
METHODS = (
    "grpo", "clip_higher", "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov",
    "pos_adv", "steer",
)  # fmt: skip
VARIANTS = (
    "pos_adv:stage", "pos_adv:rand_pos_clip", "pos_adv:adv_pos_only", "pos_adv:adv_neg_only",
    "steer:linear",
)  # fmt: skip


def config_path(method: str, preset: str) -> str:
    """`steer:linear` -> `configs/steer.py:linear` (with the preset where not demo)."""
    file, _, option = method.partition(":")
    arg = ",".join(x for x in (preset if preset != "demo" else "", option) if x)
    return f"configs/{file}.py" + (f":{arg}" if arg else "")


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    methods = list(METHODS) + (list(VARIANTS) if "all" in options else [])
    if "methods" in options:
        methods = options["methods"].split("+")
    points = axis("config", [config_path(m, preset) for m in methods])
    n = int(options.get("seeds", 1))
    return product(points, seeds(n)) if n > 1 else points
