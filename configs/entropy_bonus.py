"""Fixed entropy regularisation: loss -= entropy_coef * agg(H)."""

from jaxrlvr.config import base_config, is_demo, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "entropy_bonus"
    config.algo.intervention = "entropy_bonus"
    # 1e-3 is the customary coefficient at 7B scale; the demo's tiny policy needs more.
    config.algo.entropy_coef = 0.02 if is_demo(preset) else 1e-3
    return config
