"""STEER (Hao et al.): per-token weights from the first-order entropy change.

Formulas: docs/algorithms.md#steer.

    python -m jaxrlvr.train --config=configs/steer.py               # the embedded demo
    python -m jaxrlvr.train --config=configs/steer.py:qwen2.5-math-7b \\
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.train_files=/data/dapo.parquet

`configs/steer.py:linear` selects the linear variant (weights in [0.8, 1.2]).
"""

from jaxrlvr.config import base_config, parse_arg


def get_config(arg: str = "demo"):
    preset, options = parse_arg(arg, ("linear",))
    config = base_config(preset)
    config.name = "steer"
    config.algo.intervention = "steer"
    if preset != "demo":
        config.algo.eps_high = 0.28  # as the STEER runs: docs/algorithms.md#reference-settings
    if "linear" in options:
        config.name = "steer-linear"
        config.algo.steer.linear = True
        config.algo.steer.lambda_max = 1.2
    return config
