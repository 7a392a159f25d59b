"""Off-policy updates: optimizer updates per step (prompts_per_step / mini_batch_prompts).

The rollout batch stays the same; smaller mini-batches give more, increasingly
off-policy updates per step (1, 2, 4, 8 on the demo's 32 prompts per step).

    python -m jaxrlvr.sweep --sweep=sweeps/off_policy.py --root=runs/off-policy
    python -m jaxrlvr.sweep --sweep=sweeps/off_policy.py:method=steer --root=runs/off-policy-steer

ARG: a preset (`demo` by default), `method=NAME` (a config file name, default grpo),
`seeds=N`.
"""

from jaxrlvr.config import load_config_file
from jaxrlvr.sweep import axis, product, seeds, sweep_arg


def get_sweep(arg=None):
    preset, options = sweep_arg(arg)
    config = f"configs/{options.get('method', 'grpo')}.py" + (
        f":{preset}" if preset != "demo" else ""
    )
    per_step = load_config_file(config).train.prompts_per_step
    minis = [per_step // u for u in (1, 2, 4, 8) if per_step % u == 0]
    points = product(axis("config", [config]), axis("train.mini_batch_prompts", minis))
    n = int(options.get("seeds", 1))
    return product(points, seeds(n)) if n > 1 else points
