"""A new user's first run, with real-format inputs, under the runtime install alone.

The checkpoint, tokenizer, chat template and data files are written the way the
published ones are (`tests/real_inputs.py`), not by jaxrlvr. Every command runs in a
fresh venv holding `pip install -e .` without extras (the test extra brings torch, and
torch brings jinja2, which hid that every real tokenizer's chat template needs it), from a
directory outside the repository, with documented options only (README, docs/config.md,
docs/study.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import real_inputs

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N = 2  # samples per prompt, in training and evaluation


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> Path:
    """The python of a fresh venv with the runtime install of this repository."""
    venv = tmp_path_factory.mktemp("runtime-venv")
    python = str(venv / "bin" / "python")
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "-q", "--no-compile", "-e", str(REPO)],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        )
    return Path(python)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Both checkpoint layouts and the four data files."""
    root = tmp_path_factory.mktemp("real-inputs")
    paths = real_inputs.write_data(root / "data")
    for layout in real_inputs.TEMPLATE_LAYOUTS:
        directory = root / f"Qwen2.5-tiny-{layout}"
        paths[f"ckpt-{layout}"] = real_inputs.write_checkpoint(directory, layout)
    return paths


def run(
    python: Path, args: list[str], cwd: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python args` as a user runs it: one CPU device, no test settings, nothing online."""
    venv = python.parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "JAXRLVR_CACHE": str(cwd / "cache"),
    }
    out = subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{args[:2]} exited {out.returncode}:\n{out.stderr[-4000:]}"
    return out


def test_rendered_prompt_ids_are_the_chat_templates(runtime, inputs, tmp_path):
    """The trainer's prompt ids are `apply_chat_template(..., tokenize=True)`'s, for a
    template inline in tokenizer_config.json and in chat_template.jinja."""
    script = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import real_inputs as r; paths = json.loads(sys.argv[2]);"
        "data = {k: Path(v) for k, v in paths.items() if not k.startswith('ckpt-')};"
        "print(json.dumps({k: r.prompt_id_mismatches(Path(v), data)"
        " for k, v in paths.items() if k.startswith('ckpt-')}))"
    )
    paths = json.dumps({k: str(v) for k, v in inputs.items()})
    out = run(runtime, ["-c", script, str(TESTS), paths], tmp_path)
    mismatches = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(mismatches) == {"ckpt-inline", "ckpt-jinja"}
    assert mismatches == {"ckpt-inline": [], "ckpt-jinja": []}


def test_train_two_steps_then_evaluate(runtime, inputs, tmp_path):
    """GRPO on DAPO-Math-17k + AMC (other prompt and answer columns) with eval on
    MATH-500 and AIME, then `jaxrlvr.evaluate` on the run and on a bare checkpoint."""
    workdir = tmp_path / "runs" / "grpo-tiny"
    train = [
        "-m", "jaxrlvr.train", f"--config={REPO / 'configs' / 'grpo.py'}:qwen2.5-0.5b",
        f"--config.model.path={inputs['ckpt-inline']}",
        "--config.data.train_files="
        f"path={inputs['dapo']},path={inputs['amc']},prompt_field=question,answer_field=answer",
        f"--config.data.eval_files=name=math500,path={inputs['math500']},"
        f"name=aime24,path={inputs['aime']}",
        f"--config.workdir={workdir}",
        "--config.data.max_prompt_len=160", "--config.rollout.max_new_tokens=8",
        f"--config.rollout.n={N}", "--config.rollout.max_slots=8",
        "--config.train.steps=2", "--config.train.prompts_per_step=4",
        "--config.train.mini_batch_prompts=4", "--config.train.micro_batch_sequences=8",
        "--config.train.eval_every=2", f"--config.train.eval_n={N}",
        "--config.train.eval_max_prompts=2", "--config.train.progress=false",
        "--config.reward.num_workers=1",
    ]  # fmt: skip
    run(runtime, train, tmp_path)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    evals = [r for r in rows if f"eval_avg@{N}" in r]
    assert [r["step"] for r in evals] == [0, 2]  # before training and at the last step
    for name in ("math500", "aime24"):
        assert all(r[f"eval/{name}/prompts"] == 2 for r in evals), evals
    hf = workdir / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    # The export keeps the chat template (inline or as chat_template.jinja): the exported
    # policy renders its prompts as the original did.
    saved = json.loads((hf / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None:
        saved = (hf / "chat_template.jinja").read_text()
    assert saved == real_inputs.CHAT_TEMPLATE

    # The run's own eval sets, settings from its recorded config.
    out = tmp_path / "eval-run"
    run(runtime, ["-m", "jaxrlvr.evaluate", f"--workdir={workdir}", f"--n={N}",
                  "--max_prompts=2", f"--out={out}"], tmp_path)  # fmt: skip
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"math500", "aime24", "all"}
    assert all(results[k]["prompts"] == 2 for k in ("math500", "aime24")), results
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * N

    # A bare Hugging Face directory (template in chat_template.jinja), no run config, no
    # --preset: lengths come from the checkpoint; the AMC set names its own columns.
    out = tmp_path / "eval-bare"
    run(runtime, ["-m", "jaxrlvr.evaluate", f"--checkpoint={inputs['ckpt-jinja']}",
                  f"--eval=name=amc23,path={inputs['amc']},prompt_field=question,"
                  "answer_field=answer", f"--n={N}", "--max_prompts=2",
                  "--max_new_tokens=8", f"--out={out}"], tmp_path)  # fmt: skip
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == ["amc23"] and results["amc23"]["prompts"] == 2, results
