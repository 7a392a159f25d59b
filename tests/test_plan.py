"""`jaxrlvr.plan`: slice names, bad input, and ahead-of-time plans of small models.

The TPU cases compile for a slice described by libtpu (the `tpu` extra) on this CPU; they
are skipped where libtpu is not installed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from config_files import get_config

from jaxrlvr import plan as plan_lib
from jaxrlvr.models import preset

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='needs libtpu (pip install ".[tpu]")')


@pytest.mark.parametrize(
    "name, topology, chips, hbm",
    [
        ("v5p-8", "v5p:2x2x1", 4, 95),
        ("v5p-64", "v5p:2x4x4", 32, 95),
        ("v4-32", "v4:2x2x4", 16, 32),
        ("v5litepod-16", "v5e:4x4", 16, 16),
        ("v6e-8", "v6e:2x4", 8, 32),
        ("v5p:2x2x2", "v5p:2x2x2", 8, 95),
    ],
)
def test_slice_names(name, topology, chips, hbm):
    s = plan_lib.parse_slice(name)
    assert (s.topology, s.chips, s.hbm_gib) == (topology, chips, hbm)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9-8", "unknown TPU slice; accepted: v4-8, "),
        ("v5p-6", "no v5p slice of that size; accepted: v5p-8, v5p-16"),
        ("v5p:2x2", "a v5p torus has 3 sizes"),
    ],
)
def test_unknown_slices_name_the_accepted_ones(name, message):
    with pytest.raises(plan_lib.PlanError, match=message):
        plan_lib.parse_slice(name)


def test_mesh_must_cover_the_slice():
    assert plan_lib.parse_mesh("1,-1,2", (1, -1, 1), 8) == (1, 4, 2)
    assert plan_lib.parse_mesh(None, (1, -1, 1), 8) == (1, 8, 1)
    with pytest.raises(plan_lib.PlanError, match="does not cover the 8 devices"):
        plan_lib.parse_mesh("1,4,1", (1, -1, 1), 8)


def test_preset_without_model_config():
    from jaxrlvr.config import ConfigError, model_architecture

    config = get_config("grpo.py", "qwen2.5-0.5b")
    assert model_architecture(config).num_hidden_layers == 24
    config.preset = "qwen3-moe"
    with pytest.raises(ConfigError, match="config.preset='qwen3-moe' has no model config"):
        model_architecture(config)


def test_bad_input_is_one_line_before_any_compilation():
    out = subprocess.run(
        [sys.executable, "-m", "jaxrlvr.plan", "--config=configs/grpo.py:qwen2.5-0.5b",
         "--topology=v9-8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --topology='v9-8': unknown")
    assert "compiled" not in out.stdout


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A config.json (no weights: the planner needs none) with 0.5B's structure, shrunk."""
    path = tmp_path_factory.mktemp("small")
    cfg = preset("qwen2.5-0.5b").replace(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return path


def small_config(path, method="steer.py"):
    config = get_config(method, "qwen2.5-0.5b")
    config.model.path = str(path)
    config.data.max_prompt_len = 64
    config.rollout.max_new_tokens = 64
    config.rollout.max_slots = 16
    config.train.prompts_per_step = 4
    config.train.mini_batch_prompts = 2
    config.train.micro_batch_sequences = 16
    return config


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_plan_on_local_devices_and_what_would_fit(small_model):
    config = small_config(small_model, "kl_cov.py")
    config.algo.kl_coef = 0.01  # adds the reference pass
    config.diagnostics.entropy_check_every = 5
    result = plan_lib.plan(config, log=lambda _: None)
    names = [p["name"] for p in result["programs"]]
    assert names == [
        "sampler_sync", "prefill", "insert", "generate", "policy_pass", "update",
        "step_inputs", "finish_step", "diagnostics", "entropy_check", "reference_pass",
    ]  # fmt: skip
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and result["fits"]
    rows = {p["name"]: p for p in result["programs"]}
    assert rows["update"]["temp"] > 0 and rows["update"]["flops"] > rows["policy_pass"]["flops"] / 2
    assert rows["reference_pass"]["arguments"] == rows["policy_pass"]["arguments"]

    # With a chip just too small for micro-batches of 16, the planner finds 8.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    planner = plan_lib.Planner(config, mesh, None, log=lambda _: None)
    (update16,) = planner.train_rows(config, only={"update"})
    config.train.micro_batch_sequences = 8
    (update8,) = planner.train_rows(config, only={"update"})
    config.train.micro_batch_sequences = 16
    assert update8.temp < update16.temp
    planner.hbm_bytes = (update8.total + update16.total) // 2
    assert not planner.fits(update16)
    assert planner.suggest(update16).startswith("--config.train.micro_batch_sequences=8 ")
    (generate,) = planner.sampler_rows(config, only={"generate"})
    planner.hbm_bytes = generate.total - 1
    assert planner.suggest(generate).startswith("--config.rollout.max_slots=")
    planner.hbm_bytes = generate.arguments // 2
    assert "spread the state over at least" in planner.suggest(generate)


@needs_libtpu
def test_plan_for_a_tpu_slice_from_this_cpu(small_model, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxrlvr.plan", "--config=configs/steer.py:qwen2.5-0.5b",
         f"--config.model.path={small_model}", "--config.data.max_prompt_len=64",
         "--config.rollout.max_new_tokens=64", "--config.rollout.max_slots=16",
         "--config.train.prompts_per_step=4", "--config.train.mini_batch_prompts=2",
         "--config.train.micro_batch_sequences=16", "--topology=v5p-8", "--mesh=1,2,2",
         f"--json={tmp_path / 'plan.json'}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "", "XLA_FLAGS": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every program fits" in out.stdout
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert result["hbm_bytes_per_device"] == 95 * 2**30
    update = next(p for p in result["programs"] if p["name"] == "update")
    assert 0 < update["total"] < 2**30 and update["compile_s"] > 0
