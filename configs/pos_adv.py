"""Positive-advantage reweighting (seed 000): weight lambda on A > 0 tokens.

The argument picks the schedule (and optionally the model preset), e.g.
`configs/pos_adv.py:entropy_guided` or `configs/pos_adv.py:qwen2.5-math-7b,stage`:

- `constant` (lambda = `algo.pos_adv.lam`), `stage`, `epoch`, `entropy_guided` (default),
  `rand_pos_clip`: docs/algorithms.md#positive-advantage-reweighting;
- `adv_pos_only`: the "Adv>=0 only" ablation (weight 0 on A < 0 tokens);
- `adv_neg_only`: the "Adv<=0 only" ablation (lambda = 0).
"""

from jaxrlvr.config import ConfigError, base_config, is_demo, parse_arg
from jaxrlvr.methods.pos_adv import SCHEDULES as POS_ADV_SCHEDULES

ABLATIONS = ("adv_pos_only", "adv_neg_only")


def get_config(arg: str = "demo"):
    preset, options = parse_arg(arg, POS_ADV_SCHEDULES + ABLATIONS)
    if len(options) > 1:
        raise ConfigError(f"configs/pos_adv.py: choose one schedule, got {', '.join(options)}")
    choice = options[0] if options else "entropy_guided"
    config = base_config(preset)
    config.name = f"pos_adv-{choice}"
    config.algo.intervention = "pos_adv"
    p = config.algo.pos_adv
    p.schedule = "constant" if choice in ABLATIONS else choice
    if choice == "adv_pos_only":
        p.lam, p.neg_weight = 1.0, 0.0
    elif choice == "adv_neg_only":
        p.lam = 0.0
    if is_demo(preset):
        p.delta = 0.1  # between the demo policy's start (0.13) and collapsed (0.08) entropy
    return config
