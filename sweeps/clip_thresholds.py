"""Clip-Higher: the upper clip threshold eps_high at a fixed eps_low = 0.2.

    python -m jaxrlvr.sweep --sweep=sweeps/clip_thresholds.py --root=runs/clip-thresholds

ARG: a preset (`demo` by default), `seeds=N`.
"""

from jaxrlvr.sweep import axis, product, seeds, sweep_arg


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    config = "configs/clip_higher.py" + (f":{preset}" if preset != "demo" else "")
    points = product(axis("config", [config]), axis("algo.eps_high", [0.2, 0.24, 0.28, 0.32]))
    n = int(options.get("seeds", 1))
    return product(points, seeds(n)) if n > 1 else points
