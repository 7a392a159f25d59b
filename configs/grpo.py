"""GRPO: symmetric PPO clipping, no entropy intervention (the baseline).

    python -m jaxrlvr.train --config=configs/grpo.py                    # embedded demo
    python -m jaxrlvr.train --config=configs/grpo.py:qwen2.5-math-7b \\
        --config.model.path=/ckpt/Qwen2.5-Math-7B --config.data.train_files=/data/dapo.parquet
"""

from jaxrlvr.config import base_config, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "grpo"
    return config
