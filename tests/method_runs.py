"""One training step of every `configs/*.py` (and more pos_adv schedules) on the embedded
demo policy: two updates, the second off-policy, and the controllers' next values. The
policy solves about half of the prompts, so the advantages, and with them every method's
weights and selections, are not zero. The metrics a refactor must leave unchanged.
(`gspo.py` was added to the file with the method, by the code that introduced it.)

`python tests/method_runs.py --write` records them in `tests/fixtures/method_runs.json`
(from the code before a change); `--check` (run by `tests/test_methods.py`) compares a
fresh run with the file at 1e-6 relative and names every difference (metrics added
since, such as the `mismatch_*` ones, are not compared). Times and rates
are left out. One CPU device (run it without the tests' 8 fake devices).
"""

import json
import sys
import tempfile
from pathlib import Path

from config_files import CONFIG_FILES, get_config

FIXTURE = Path(__file__).parent / "fixtures" / "method_runs.json"
RUNS = [(name, None) for name in CONFIG_FILES] + [
    ("pos_adv.py", arg) for arg in ("stage", "rand_pos_clip", "adv_pos_only")
]  # steer's norm_sequences (8) divides the micro-batch of 8
VOLATILE = ("time_", "tokens_per_s", "seconds")


def run(name: str, arg: str | None, workdir: Path, **changes) -> list[dict]:
    """The metrics rows of one step of `name:arg` (with `changes` to the overrides)."""
    from jaxrlvr.runtime.metrics import read_metrics
    from jaxrlvr.train import Trainer

    c = get_config(name, arg)
    c.workdir = str(workdir)
    overrides = {
        "rollout.n": 4, "rollout.max_slots": 16, "train.steps": 1,
        "train.prompts_per_step": 8, "train.mini_batch_prompts": 4,
        "train.micro_batch_sequences": 8, "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.progress": False, "optim.warmup_steps": 0, "optim.lr": 1e-4,
    }  # fmt: skip
    if c.algo.intervention == "adaptive_entropy":  # below the target: the bonus acts
        overrides["algo.adaptive_entropy.target"] = 0.5
    c.update_from_flattened_dict(overrides | changes)
    Trainer(c).run()
    return [
        {k: v for k, v in row.items() if not any(s in k for s in VOLATILE)}
        for row in read_metrics(str(workdir))
    ]


def run_all(root: Path) -> dict[str, list[dict]]:
    return {f"{name}:{arg or ''}": run(name, arg, root / f"{name}-{arg}") for name, arg in RUNS}


# Metrics that measure float32 rounding itself (the sampler's log-probs against the
# learner's, ~1e-7 per token): compared to 1e-6 absolute.
ROUNDING = ("mismatch_", "sampler_logp_abs_diff")


def differences(
    got: dict, want: dict, rtol: float = 1e-6, atol: float = 0.0, only_wanted: bool = False
) -> list[str]:
    """Every value of `got` that differs from `want` (`only_wanted`: metrics added since
    `want` was recorded are not differences)."""
    out = []
    for run_name in sorted(set(got) | set(want)):
        a, b = got.get(run_name), want.get(run_name)
        if a is None or b is None or len(a) != len(b):
            out.append(f"{run_name}: rows {a and len(a)} != {b and len(b)}")
            continue
        for row_a, row_b in zip(a, b, strict=True):
            for key in sorted(set(row_b) if only_wanted else set(row_a) | set(row_b)):
                x, y = row_a.get(key), row_b.get(key)
                tol = max(atol, 1e-6) if key.startswith(ROUNDING) and atol else atol
                same = x == y or (
                    isinstance(x, float) and isinstance(y, float)
                    and abs(x - y) <= tol + rtol * max(abs(x), abs(y), 1e-30)
                )  # fmt: skip
                if not same:
                    out.append(f"{run_name} step {row_a.get('step')}: {key} {x!r} != {y!r}")
    return out


def single_pass_differences(root: Path) -> list[str]:
    """Every configs/*.py with one update per step, once with the old log-probs from the
    update's own pass (`train.single_pass`) and once with the separate old-policy pass:
    the differences of their metrics (1e-6 relative, or 5e-8 absolute for values that are
    0 up to float32 rounding: `approx_kl`, a loss whose advantages sum to 0; 1e-6 for
    the sampler/learner mismatch metrics, which measure that rounding) and trained
    parameters.

    The two passes' log-probs differ by rounding (~1e-7), which AdamW's first update
    (each parameter moves by lr * g / (|g| + 1e-8)) turns into differences of a few
    percent of lr where a gradient is ~1e-8 (4% measured): parameters are compared to
    10% of `optim.lr`, gradients by `grad_norm` at 1e-6. KL-Cov runs with its penalty
    off: at logp == old_logp its |logp - old_logp| has gradient 0 in one pass, and a
    rounding-noise sign in two (`test_kl_cov_penalty_is_flat_on_policy`)."""
    import numpy as np
    from safetensors.numpy import load_file

    from jaxrlvr.rl.grpo import single_pass

    one_update = {"train.prompts_per_step": 8, "train.mini_batch_prompts": 8}
    out = []
    for name in CONFIG_FILES:
        c = get_config(name)
        changes = one_update | ({"algo.kl_cov.kl_coef": 0.0} if name == "kl_cov.py" else {})
        c.update_from_flattened_dict(changes)
        uses = single_pass(c)
        if uses == (c.algo.intervention == "adaptive_entropy"):
            out.append(f"{name}: single_pass(config) is {uses}")
        runs, params = {}, {}
        for fused in (True, False):
            workdir = root / f"{name}-{fused}"
            runs[fused] = run(name, None, workdir, **changes, **{"train.single_pass": fused})
            params[fused] = load_file(str(workdir / "hf" / "model.safetensors"))
        out += differences({name: runs[True]}, {name: runs[False]}, atol=5e-8)
        lr = runs[True][-1]["lr"]
        for key, a in params[True].items():
            b = params[False][key]
            if not np.allclose(a, b, rtol=0.0, atol=0.1 * lr):
                out.append(f"{name}: parameter {key} differs by {np.max(np.abs(a - b)):.3g}")
    return out


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--check"], ["--single-pass"]):
        sys.exit("usage: python tests/method_runs.py --write | --check | --single-pass")
    if sys.argv[1] == "--single-pass":
        with tempfile.TemporaryDirectory() as tmp:
            diffs = single_pass_differences(Path(tmp))
        print("\n".join(diffs) or f"{len(CONFIG_FILES)} configs: one pass == two passes")
        sys.exit(1 if diffs else 0)
    with tempfile.TemporaryDirectory() as tmp:
        runs = json.loads(json.dumps(run_all(Path(tmp))))
    if sys.argv[1] == "--write":
        FIXTURE.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({len(runs)} runs)")
    else:
        diffs = differences(runs, json.loads(FIXTURE.read_text()), only_wanted=True)
        print("\n".join(diffs) or f"{len(runs)} runs equal to {FIXTURE.name}")
        sys.exit(1 if diffs else 0)
