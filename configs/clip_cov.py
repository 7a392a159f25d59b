"""Clip-Cov (Cui et al. 2025): detach a random few high-covariance tokens from the gradient."""

from jaxrlvr.config import base_config, is_demo, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "clip_cov"
    config.algo.intervention = "clip_cov"
    config.algo.eps_low = config.algo.eps_high = 1.0  # as the reference scripts
    config.algo.dual_clip = 0.0  # no dual clip with this loss
    if is_demo(preset):  # 2e-4 of a demo batch is a single token: scale up to be visible
        config.algo.clip_cov.ratio = 2e-2
    return config
