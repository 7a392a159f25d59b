"""GSPO (Zheng et al. 2025): the PPO clip on the sequence-level importance ratio.

Formulas: docs/algorithms.md#gspo. As verl's GSPO recipe: clip range 3e-4 / 4e-4 on the
sequence ratio, seq-mean-token-mean aggregation, no dual clip.

    python -m jaxrlvr.train --config=configs/gspo.py                # the embedded demo
    python -m jaxrlvr.train --config=configs/gspo.py:qwen2.5-math-7b \\
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.train_files=/data/dapo.parquet
"""

from jaxrlvr.config import base_config, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg, ())
    config = base_config(preset)
    config.name = "gspo"
    config.algo.intervention = "gspo"
    config.algo.eps_low = 3e-4
    config.algo.eps_high = 4e-4
    config.algo.dual_clip = 0.0
    config.algo.loss_agg = "seq-mean-token-mean"
    return config
