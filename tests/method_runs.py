"""One training step of every `configs/*.py` (and more pos_adv schedules) on the embedded
demo policy: two updates, the second off-policy, and the controllers' next values. The
policy solves about half of the prompts, so the advantages, and with them every method's
weights and selections, are not zero. The metrics a refactor must leave unchanged.
(`gspo.py` was added to the file with the method, by the code that introduced it.)

`python tests/method_runs.py --write` records them in `tests/fixtures/method_runs.json`
(from the code before a change); `--check` (run by `tests/test_methods.py`) compares a
fresh run with the file at 1e-6 relative and names every difference. Times and rates
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


def run(name: str, arg: str | None, workdir: Path) -> list[dict]:
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
    c.update_from_flattened_dict(overrides)
    Trainer(c).run()
    return [
        {k: v for k, v in row.items() if not any(s in k for s in VOLATILE)}
        for row in read_metrics(str(workdir))
    ]


def run_all(root: Path) -> dict[str, list[dict]]:
    return {f"{name}:{arg or ''}": run(name, arg, root / f"{name}-{arg}") for name, arg in RUNS}


def differences(got: dict, want: dict, rtol: float = 1e-6) -> list[str]:
    out = []
    for run_name in sorted(set(got) | set(want)):
        a, b = got.get(run_name), want.get(run_name)
        if a is None or b is None or len(a) != len(b):
            out.append(f"{run_name}: rows {a and len(a)} != {b and len(b)}")
            continue
        for row_a, row_b in zip(a, b, strict=True):
            for key in sorted(set(row_a) | set(row_b)):
                x, y = row_a.get(key), row_b.get(key)
                same = x == y or (
                    isinstance(x, float) and isinstance(y, float)
                    and abs(x - y) <= rtol * max(abs(x), abs(y), 1e-30)
                )  # fmt: skip
                if not same:
                    out.append(f"{run_name} step {row_a.get('step')}: {key} {x!r} != {y!r}")
    return out


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--check"]):
        sys.exit("usage: python tests/method_runs.py --write | --check")
    with tempfile.TemporaryDirectory() as tmp:
        runs = json.loads(json.dumps(run_all(Path(tmp))))
    if sys.argv[1] == "--write":
        FIXTURE.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({len(runs)} runs)")
    else:
        diffs = differences(runs, json.loads(FIXTURE.read_text()))
        print("\n".join(diffs) or f"{len(runs)} runs equal to {FIXTURE.name}")
        sys.exit(1 if diffs else 0)
