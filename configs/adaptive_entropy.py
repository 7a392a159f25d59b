"""Adaptive entropy regularisation (Skywork-OR1 `EntController`).

Formulas: docs/algorithms.md#adaptive-entropy-control.
"""

from jaxrlvr.config import base_config, is_demo, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "adaptive_entropy"
    config.algo.intervention = "adaptive_entropy"
    if is_demo(preset):  # the reference values (target 0.2, delta 1e-4) are for 7B runs
        e = config.algo.adaptive_entropy
        e.target, e.delta, e.alpha_max = 0.1, 2e-3, 0.05  # the demo's entropy scale
    return config
