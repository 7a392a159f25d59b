"""STEER: the smallest token weight lambda_min (1.0 is plain GRPO with Clip-Higher).

    python -m jaxrlvr.sweep --sweep=sweeps/steer_lambda.py --root=runs/steer-lambda

ARG: a preset (`demo` by default), `linear` (the linear weights), `seeds=N`.
"""

from jaxrlvr.sweep import axis, product, seeds, sweep_arg


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    arg = ",".join(
        x for x in (preset if preset != "demo" else "", "linear" * ("linear" in options)) if x
    )
    config = "configs/steer.py" + (f":{arg}" if arg else "")
    points = product(
        axis("config", [config]), axis("algo.steer.lambda_min", [0.6, 0.7, 0.8, 0.9, 1.0])
    )
    n = int(options.get("seeds", 1))
    return product(points, seeds(n)) if n > 1 else points
