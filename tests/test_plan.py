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
from jaxrlvr import roofline
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

    # The time of a step: every program's calls at the roofline of this CPU (measured).
    t = result["time"]
    assert t["chip"]["source"].startswith("measured here") and t["chip"]["peak_flops"] > 0
    calls = {p["name"]: p["calls"] for p in t["programs"]}
    assert calls["update"] == 2 and calls["policy_pass"] == 1 and calls["entropy_check"] == 0.2
    assert calls["generate"] == roofline.generate_calls(4 * 8, 16, 64, 8) == 16
    assert t["step_s"] == pytest.approx(sum(p["step_s"] for p in t["programs"]))
    assert all(p["bound"] in ("compute", "memory", "collectives") for p in t["programs"])
    assert rows["update"]["bytes_accessed"] > 0 and rows["update"]["collective_bytes"] > 0
    assert t["run_hours"] == pytest.approx(t["step_s"] * config.train.steps / 3600)
    # Shorter responses: fewer decode calls, less learner work, a shorter step.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    planner = plan_lib.Planner(config, mesh, None, log=lambda _: None, chips=8)
    table = [
        plan_lib.Row(**{k: v for k, v in p.items() if k != "total"}) for p in result["programs"]
    ]
    chip = roofline.Chip(**t["chip"])
    short = plan_lib.timing(planner, table, chip, 16)
    assert short["step_s"] < t["step_s"]
    assert {p["name"]: p["calls"] for p in short["programs"]}["generate"] == 4
    with pytest.raises(plan_lib.PlanError, match="--mean_response_len=100: must be in"):
        plan_lib.plan(config, log=lambda _: None, mean_response_len=100)
    with pytest.raises(plan_lib.PlanError, match="--topology='v9-8': unknown TPU slice"):
        plan_lib.compare(config, ["v5p-8", "v9-8"], None)  # refused before any compile

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
    t = result["time"]  # v5p's published rates, one device per chip
    assert (t["chip"]["peak_flops"], t["chip"]["hbm_bytes_per_s"]) == (459e12, 2765e9)
    assert t["chip_hours"] == pytest.approx(t["run_hours"] * 4) and t["step_s"] > 0
    assert "Estimated time" in out.stdout and "chip-hours" in out.stdout


def test_roofline_terms():
    chip = roofline.Chip(
        "x", peak_flops=1e12, hbm_bytes_per_s=1e11, ici_bytes_per_s=1e10, source=""
    )
    assert roofline.call_time(2e12, 1e10, 1e9, chip) == roofline.Estimate(2.0, "compute")
    assert roofline.call_time(1e9, 1e12, 0.0, chip) == roofline.Estimate(10.0, "memory")
    assert roofline.call_time(0.0, 0.0, 1e11, chip) == roofline.Estimate(10.0, "collectives")
    # 4096 sequences of 1000 tokens over 256 slots, 8 per call: 2000 calls; one sequence
    # of 1000 tokens still needs 125.
    assert roofline.generate_calls(4096, 256, 1000, 8) == 2000
    assert roofline.generate_calls(4, 256, 1000, 8) == 125
    assert roofline.gather_bytes(800, 8) == 700 and roofline.gather_bytes(800, 1) == 0
