"""Clip-Higher (DAPO): a wider upper clip, eps_high = 0.28 > eps_low = 0.2."""

from jaxrlvr.config import base_config, parse_arg


def get_config(arg: str = "demo"):
    preset, _ = parse_arg(arg)
    config = base_config(preset)
    config.name = "clip_higher"
    config.algo.eps_low, config.algo.eps_high = 0.2, 0.28
    return config
