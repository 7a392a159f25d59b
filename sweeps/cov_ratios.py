"""Clip-Cov and KL-Cov: the fraction of high-covariance tokens each method acts on.

    python -m jaxrlvr.sweep --sweep=sweeps/cov_ratios.py --root=runs/cov-ratios

The demo's batches hold about 4,000 response tokens, so its ratios are a hundred times
the paper's (2e-4 for Clip-Cov, 2e-3 for KL-Cov at 7B): the paper presets use the
paper's grid. ARG: a preset (`demo` by default), `seeds=N`.
"""

from jaxrlvr.config import is_demo
from jaxrlvr.sweep import axis, product, seeds, sweep_arg

RATIOS = {  # preset kind -> method -> ratios
    "demo": {"clip_cov": [5e-3, 2e-2, 5e-2], "kl_cov": [5e-3, 2e-2, 5e-2]},
    "paper": {"clip_cov": [1e-4, 2e-4, 5e-4], "kl_cov": [1e-3, 2e-3, 5e-3]},
}


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    grid = RATIOS["demo" if is_demo(preset) else "paper"]
    suffix = f":{preset}" if preset != "demo" else ""
    points = []
    for method, ratios in grid.items():
        points += product(
            axis("config", [f"configs/{method}.py{suffix}"]), axis(f"algo.{method}.ratio", ratios)
        )
    n = int(options.get("seeds", 1))
    return product(points, seeds(n)) if n > 1 else points
