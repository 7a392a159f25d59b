"""Hugging Face checkpoint loading and export."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import TEST_CONFIGS, save_random_hf_checkpoint, tiny, torch_logits
from tiny_policy import write_tiny_policy

from jaxrlvr.config import ConfigError
from jaxrlvr.models import Qwen2, checkpoint, load_hf_checkpoint, save_hf_checkpoint
from jaxrlvr.models.checkpoint import ExportError, ModelDirError, check_hf_checkpoint


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize(
    "arch",
    [
        dict(tie_word_embeddings=True),
        dict(tie_word_embeddings=False),
        TEST_CONFIGS["qwen3-untied-gqa"],
    ],
)
def test_export_round_trip_is_exact(tmp_path, arch):
    cfg = tiny(**arch)
    tied = cfg.tie_word_embeddings
    model = Qwen2(cfg, rngs=nnx.Rngs(7))
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # non-trivial biases and norms
        v.set_value(
            v[...] + 0.1 * jnp.asarray(np.random.RandomState(v.size).randn(*v.shape), v.dtype)
        )
    save_hf_checkpoint(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(hf).__name__ == f"{cfg.model_type.capitalize()}ForCausalLM"
    assert hf.config.tie_word_embeddings == tied

    # Parameters are bit-identical after the HF round trip (ours -> HF -> save -> ours).
    hf.save_pretrained(tmp_path / "again")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            _params(model).values(),
            _params(load_hf_checkpoint(tmp_path / "again")).values(),
            strict=True,
        )
    )
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(
        ours, torch_logits(hf.eval(), ids), rtol=0, atol=1e-5 * np.abs(ours).max()
    )


def test_sharded_checkpoints_load(tmp_path):
    cfg = tiny(tie_word_embeddings=False)
    hf = save_random_hf_checkpoint(cfg, tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    model = load_hf_checkpoint(tmp_path / "hf")
    ids = np.arange(10)[None] % cfg.vocab_size
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids))), torch_logits(hf, ids), atol=1e-5
    )

    # Our own writer shards too, and reads back bit-identically.
    save_hf_checkpoint(model, tmp_path / "ours", max_shard_bytes=50_000)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    back = load_hf_checkpoint(tmp_path / "ours")
    for a, b in zip(_params(model).values(), _params(back).values(), strict=True):
        assert np.array_equal(a, b)


def test_bfloat16_checkpoint(tmp_path):
    cfg = tiny()
    hf = save_random_hf_checkpoint(cfg, tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_hf_checkpoint(tmp_path / "bf16", param_dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    ref = hf.state_dict()["model.embed_tokens.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), ref)
    save_hf_checkpoint(model, tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_clear_errors(tmp_path):
    cfg = tiny()
    with pytest.raises(ModelDirError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "empty")

    path = tmp_path / "ckpt"
    save_random_hf_checkpoint(cfg, path)
    config = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(
        ValueError,
        match="12 tensor.s. missing from the checkpoint: 'model.layers.2.input_layernorm.weight'",
    ):
        load_hf_checkpoint(path)

    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(
        ValueError,
        match=r"down_proj.weight. in model.safetensors has shape \[64, 128\], expected \[64, 96\]",
    ):
        load_hf_checkpoint(path)

    (path / "config.json").write_text(
        json.dumps(config | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ValueError, match="config.json: unsupported architecture"):
        load_hf_checkpoint(path)

    (path / "config.json").write_text("{\n  'bad': 1\n}")
    with pytest.raises(ModelDirError, match=r"config.json:2:3: invalid JSON"):
        load_hf_checkpoint(path)

    (path / "config.json").write_text(json.dumps(config))
    os.remove(path / "model.safetensors")
    with pytest.raises(ModelDirError, match="no \\*.safetensors files"):
        load_hf_checkpoint(path)


def test_failed_export_leaves_nothing_behind(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    model = Qwen2(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(model, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert os.listdir(tmp_path) == []

    save_hf_checkpoint(model, tmp_path / "out")  # overwriting an export replaces it whole
    save_hf_checkpoint(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------ bad model directories

REPO = Path(__file__).resolve().parents[1]

# Runs `python -m jaxrlvr.<tool> ARGS...` for each case of argv[1] (a JSON list of
# [tool, args]) in one interpreter (one JAX import): each case runs the module's
# `__main__` block (its flags are removed after it); exit codes and stderr as JSON.
COMMAND_LINES = """
import contextlib, io, json, runpy, sys, traceback, warnings
from absl import app, flags
import jaxrlvr.evaluate, jaxrlvr.train  # their imports define absl's own flags

warnings.filterwarnings("ignore", "'jaxrlvr.* found in sys.modules", RuntimeWarning)

results = []
for tool, args in json.loads(sys.argv[1]):
    defined, err, code = set(flags.FLAGS), io.StringIO(), 0
    sys.argv = [tool, *args]
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module(f"jaxrlvr.{tool}", run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
    for name in set(flags.FLAGS) - defined:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_command_lines(cases: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", COMMAND_LINES, json.dumps(cases)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def bad_model_dirs(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the model directory `good`, each with one fault: name -> (directory, the
    pattern its error names). The tiny policy has hidden size 32, intermediate size 64."""
    config = json.loads((good / "config.json").read_text())
    size = (good / "model.safetensors").stat().st_size
    faults = {
        "llama": (
            {"config.json": json.dumps(config | {"model_type": "llama",
                                                 "architectures": ["LlamaForCausalLM"]})},
            r"config\.json: unsupported architecture: model_type='llama', "
            r"architectures=\['LlamaForCausalLM'\]; supported: Qwen2ForCausalLM \(qwen2, "
            r"Qwen2\.5\), Qwen3ForCausalLM \(qwen3, dense\)",
        ),
        "qwen3": (
            {"config.json": json.dumps(config | {"model_type": "qwen3",
                                                 "architectures": ["Qwen3ForCausalLM"]})},
            r"tensor\(s\) missing from the checkpoint: "
            r"'model\.layers\.0\.self_attn\.k_norm\.weight'",
        ),
        "invalid-json": (
            {"config.json": '{\n  "hidden_size": 32,\n  "vocab_size" 20\n}'},
            r"config\.json:3:16: invalid JSON: Expecting ':' delimiter",
        ),
        "shapes": (
            {"config.json": json.dumps(config | {"intermediate_size": 96})},
            r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' in model\.safetensors has "
            r"shape \[32, 64\], expected \[32, 96\]",
        ),
        "truncated": (
            {"model.safetensors": size // 2},
            rf"model\.safetensors: truncated safetensors file: {size // 2} of its {size} bytes "
            rf"\({size - size // 2} missing\); \d+ tensor\(s\) cut short, e\.g\. '[\w.]+'",
        ),
        "truncated-header": (
            {"model.safetensors": 100},
            r"model\.safetensors: truncated safetensors file: its header needs \d+ bytes, "
            r"the file has 100",
        ),
        "no-tokenizer": (
            {"tokenizer.json": None, "vocab.json": None, "merges.txt": None},
            r"no tokenizer files \(need tokenizer\.json or vocab\.json \+ merges\.txt\)",
        ),
    }  # fmt: skip
    dirs = {}
    for name, (changes, pattern) in faults.items():
        path = root / name
        shutil.copytree(good, path)
        for file, change in changes.items():
            if change is None:
                (path / file).unlink(missing_ok=True)
            elif isinstance(change, int):
                os.truncate(path / file, change)
            else:
                (path / file).write_text(change)
        dirs[name] = (path, pattern)
    return dirs


def test_check_hf_checkpoint_names_each_fault_from_the_headers(policy, tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(checkpoint._TensorRef, "read", lambda self: read.append(self))
    assert check_hf_checkpoint(policy).hidden_size == 32
    for name, (path, pattern) in bad_model_dirs(policy, tmp_path).items():
        if name == "no-tokenizer":
            continue  # a tokenizer is the trainer's need, not the loader's
        with pytest.raises(ModelDirError, match=pattern):
            check_hf_checkpoint(path)
        with pytest.raises(ModelDirError, match=pattern):
            load_hf_checkpoint(path)
    assert not read  # every fault was found before any weight was read
    assert issubclass(ModelDirError, ConfigError)


def test_chat_template_without_jinja2_is_refused_at_start_up(policy, tmp_path, monkeypatch):
    from jaxrlvr.rl import preflight

    path = tmp_path / "chat"
    shutil.copytree(policy, path)
    preflight.check_model_dir(str(path))  # no chat template: jinja2 is not needed
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    preflight.check_model_dir(str(path))
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` fails
    with pytest.raises(
        ConfigError, match=r"chat template \(chat_template\.jinja\) needs jinja2, which cannot"
    ):
        preflight.check_model_dir(str(path))
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{{ x }}"}))
    with pytest.raises(ConfigError, match=r"\(tokenizer_config\.json\) needs jinja2"):
        preflight.check_model_dir(str(path))


def test_command_lines_refuse_bad_model_dirs_and_values_in_one_line(policy, tmp_path):
    """`jaxrlvr.train` and `jaxrlvr.evaluate --checkpoint` on each bad directory, and the
    trainer on values that used to pass validation: one `error:` line each, exit 2."""
    dirs = bad_model_dirs(policy, tmp_path)

    def train(model: Path, *flags: str) -> tuple[str, list[str]]:
        return "train", [
            "--config=configs/grpo.py", f"--config.model.path={model}",
            f"--config.data.train_files={policy / 'train.jsonl'}",
            f"--config.workdir={tmp_path / 'runs' / model.name}", *flags,
        ]  # fmt: skip

    def evaluate(model: Path) -> tuple[str, list[str]]:
        spec = f"--eval=arith={policy / 'eval.jsonl'}"
        return "evaluate", [f"--checkpoint={model}", spec, f"--out={tmp_path / 'eval'}"]

    values = {
        "--config.rollout.temperature=1e-30": r"config\.rollout\.temperature=1e-30: must be "
        r">= 1e-08",
        "--config.optim.lr=inf": r"config\.optim\.lr=inf: must be a finite number",
        "--config.algo.eps_high=nan": r"config\.algo\.eps_high=nan: must be a finite number",
    }
    cases = [train(path) for path, _ in dirs.values()] + [evaluate(p) for p, _ in dirs.values()]
    cases += [train(policy, flag) for flag in values]
    patterns = [pattern for _, pattern in dirs.values()] * 2 + list(values.values())
    for (tool, args), (code, err), pattern in zip(
        cases, run_command_lines(cases), patterns, strict=True
    ):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (tool, args, code, err[-3000:])
        assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "eval").exists() or not os.listdir(tmp_path / "eval")


# `python -m jaxrlvr.train ARGS...` whose export runs under a 16 KiB file-size limit (a
# write past it fails with EFBIG, as a full disk's fails with ENOSPC); the run before it
# writes freely.
LIMITED_EXPORT = """
import resource, signal, sys
from absl import app
from jaxrlvr import train

export = train.Trainer.export

def limited(self):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
    return export(self)

train.Trainer.export = limited
train.define_flags()
app.run(train.main, argv=["train", *sys.argv[1:]], flags_parser=train.parse_flags)
"""


def test_export_past_a_write_limit_is_one_line_and_leaves_nothing(policy, tmp_path):
    workdir = tmp_path / "run"
    values = {
        "model.path": policy, "data.train_files": policy / "train.jsonl", "workdir": workdir,
        "train.steps": 1, "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
        "train.micro_batch_sequences": 4, "rollout.n": 4, "rollout.max_new_tokens": 8,
        "rollout.max_slots": 16, "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.progress": False, "optim.warmup_steps": 0,
    }  # fmt: skip
    flags = ["--config=configs/grpo.py", *(f"--config.{k}={v}" for k, v in values.items())]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", LIMITED_EXPORT, *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot write the Hugging Face export {workdir / 'hf'}: File too large (EFBIG) "
        f"writing model.safetensors; {workdir / 'hf'} is unchanged"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not [p for p in os.listdir(workdir) if p.startswith((".hf", "hf"))]
    assert (workdir / "checkpoints" / "1").is_dir()  # the trained state is kept


def test_export_on_a_full_disk_names_the_cause_and_keeps_the_old_export(tmp_path):
    class FullDisk:
        def save_pretrained(self, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}/tokenizer.json")

    model = Qwen2(tiny(), rngs=nnx.Rngs(0))
    save_hf_checkpoint(model, tmp_path / "out")
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    out = re.escape(str(tmp_path / "out"))
    with pytest.raises(
        ExportError,
        match=rf"^cannot write the Hugging Face export {out}: No space left on device "
        rf"\(ENOSPC\) writing tokenizer\.json; {out} is unchanged$",
    ):
        save_hf_checkpoint(model, tmp_path / "out", tokenizer=FullDisk())
    assert os.listdir(tmp_path) == ["out"]
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
