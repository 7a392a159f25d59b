"""GRPO (symmetric clipping, no entropy intervention).

    python -m jaxrlvr.train --config=configs/grpo.py              # the embedded demo
    python -m jaxrlvr.train --config=configs/grpo.py:qwen2.5-math-7b \
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.train_files=/data/dapo.parquet
"""

from jaxrlvr.config import base_config


def get_config(preset: str = "demo"):
    config = base_config(preset)
    config.name = "grpo"
    config.algo.eps_high = config.algo.eps_low  # plain GRPO; Clip-Higher is configs/clip_higher.py
    return config
