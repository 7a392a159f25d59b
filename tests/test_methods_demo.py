"""On the embedded demo, interventions move entropy the way the papers report.

Short runs of the real method configs on the real demo base policy (built once and cached
under `$JAXRLVR_CACHE`, about 40 s on 2 cores): the orderings that the `sweeps/methods.py`
sweep reproduces over 100 steps and three seeds (docs/methods.md) already show after
`STEPS` steps. Each run is deterministic for its seed, so a failure means the method
changed, not bad luck.
"""

import numpy as np
import pytest
from config_files import get_config

from jaxrlvr.metrics import read_metrics

STEPS = 30  # long enough for the orderings, short enough for CI (about 35 s per run)
WINDOW = 15  # final entropy: mean over the last WINDOW steps


@pytest.fixture(scope="module")
def final_entropy(tmp_path_factory):
    """Runs each method for STEPS steps; returns {method: mean entropy of the last WINDOW}."""
    from jaxrlvr.train import Trainer

    runs = {
        "grpo": get_config("grpo.py"),
        "adv_neg_only": get_config("pos_adv.py", "adv_neg_only"),
        "clip_cov": get_config("clip_cov.py"),
    }
    out = {}
    for name, c in runs.items():
        c.workdir = str(tmp_path_factory.mktemp(name))
        c.train.steps = STEPS
        c.train.eval_every = 0
        c.train.checkpoint_every = 0
        c.train.progress = False
        Trainer(c).run()
        rows = [r for r in read_metrics(c.workdir) if r["step"] > STEPS - WINDOW]
        assert len(rows) == WINDOW
        out[name] = float(np.mean([r["entropy"] for r in rows]))
    return out


def test_grpo_entropy_falls(final_entropy):
    # The demo policy starts near 0.14 (docs/methods.md); GRPO sharpens it within 30 steps.
    assert final_entropy["grpo"] < 0.13, final_entropy


def test_negative_only_keeps_entropy_above_grpo(final_entropy):
    # Seed 000: "Adv<=0 only" ends with much higher entropy than GRPO.
    assert final_entropy["adv_neg_only"] > final_entropy["grpo"] + 0.005, final_entropy


def test_clip_cov_keeps_entropy_above_grpo(final_entropy):
    # Cui et al.: detaching high-covariance tokens slows the collapse.
    assert final_entropy["clip_cov"] > final_entropy["grpo"] + 0.005, final_entropy
