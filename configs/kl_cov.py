"""KL-Cov (Cui et al. 2025): a KL penalty on the top-k covariance tokens, no ratio clipping."""

from jaxrlvr.config import base_config, is_demo, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "kl_cov"
    config.algo.intervention = "kl_cov"
    config.algo.dual_clip = 0.0
    if is_demo(preset):  # 2e-3 of a demo batch is one or two tokens: scale up to be visible
        config.algo.kl_cov.ratio = 2e-2
    return config
