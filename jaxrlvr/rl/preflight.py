"""Checks that run before anything is compiled, so a run fails in seconds, not hours.

Each raises `ConfigError` naming the config key and the file or directory at fault:
a model directory this port cannot load (see `check_model_dir`), a URL where a path is needed, a
workdir that cannot be written, a disk with less free space than one checkpoint of the
train state needs, and an attention kernel this platform cannot run.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import tempfile

import jax
import ml_collections
from flax import nnx

from jaxrlvr.config import ConfigError, updates_per_step

# A tokenizer the trainer can load: the fast tokenizer file, or the BPE vocabulary pair.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_model_dir(path: str) -> None:
    """`path` holds a Hugging Face Qwen2 config, whole safetensors weights of the config's
    shapes (checked from the headers; no weight is read) and tokenizer files, and jinja2
    is importable if the tokenizer has a chat template."""
    from jaxrlvr.models.checkpoint import ModelDirError, check_hf_checkpoint

    key = "config.model.path"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}={path!r}: no config.json in the model directory")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ConfigError(f"{key}={path!r}: no *.safetensors weights in the model directory")
    present = [
        fs for fs in TOKENIZER_FILES if all(os.path.isfile(os.path.join(path, f)) for f in fs)
    ]
    if not present:
        wanted = " or ".join(" + ".join(fs) for fs in TOKENIZER_FILES)
        raise ConfigError(
            f"{key}={path!r}: no tokenizer files (need {wanted}); copy them from the "
            "checkpoint's Hugging Face repository"
        )
    if (source := _chat_template_source(path)) is not None:
        try:
            importlib.import_module("jinja2")
        except ImportError:
            raise ConfigError(
                f"{key}={path!r}: the tokenizer's chat template ({source}) needs jinja2, "
                "which cannot be imported; pip install 'jinja2>=3.1'"
            ) from None
    try:
        check_hf_checkpoint(path)
    except ModelDirError as e:
        raise ModelDirError(f"{key}: {e}") from None


def _chat_template_source(path: str) -> str | None:
    """The file that gives the tokenizer in `path` a chat template, or None."""
    for name in ("chat_template.jinja", "chat_template.json", "additional_chat_templates"):
        if os.path.exists(os.path.join(path, name)):
            return name
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            if b'"chat_template"' in f.read():
                return "tokenizer_config.json"
    return None


def check_trackers(config: ml_collections.ConfigDict) -> None:
    """`logging.backends`: known backends, jsonl among them, every tracker's package
    installed (the error names the extra to install)."""
    from jaxrlvr.runtime.trackers import problems

    found = problems(config.logging.backends)
    if found:
        raise ConfigError(
            f"config.logging.backends={config.logging.backends!r}: {'; '.join(found)}"
        )


def check_attention(config: ml_collections.ConfigDict) -> None:
    """`model.attention` names a kernel this platform has (`auto` always does)."""
    from jaxrlvr.models.attention import check_backend

    why = check_backend(config.model.attention, jax.default_backend())
    if why:
        raise ConfigError(f"config.model.attention={config.model.attention!r}: {why}")


def check_local_path(key: str, path: str) -> None:
    """`path` (the value of `key`) is a file-system path, not a URL such as `gs://b/run`.
    Outputs are written with the OS's file calls, which would turn a URL into a local
    `gs:/...` directory; a bucket is used through a mount (gcsfuse) instead. Call it
    before anything is created."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(path))
    if scheme:
        raise ConfigError(
            f"{key}={path!r}: a {scheme.group(1)}:// URL, not a path; the outputs would land "
            "in a local directory of that name. Mount the bucket instead (e.g. `gcsfuse "
            f"--implicit-dirs BUCKET /mnt/BUCKET`) and set {key} to a path under the mount"
        )


def check_workdir(workdir: str) -> None:
    """The workdir exists (created if needed) and a file can be written and removed there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"config.workdir={workdir!r}: cannot write there ({e.strerror})"
        ) from None


def checkpoint_bytes(config: ml_collections.ConfigDict) -> int:
    """Bytes of one checkpoint of the train state: parameters and optimizer moments,
    from the model directory's config (shapes only; nothing is allocated or compiled)."""
    from jaxrlvr.config import model_architecture
    from jaxrlvr.models import Qwen2
    from jaxrlvr.rl import grpo

    c = config
    cfg = model_architecture(c)
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    tx, _ = grpo.make_optimizer(c.optim, c.train.steps, updates_per_step(c))
    opt_state = jax.eval_shape(tx.init, params)
    leaves = jax.tree.leaves((params, opt_state))
    return sum(x.size * x.dtype.itemsize for x in leaves)


def check_disk_space(directory: str, need_bytes: int, what: str = "one checkpoint") -> None:
    """`directory`'s file system has at least `need_bytes` free."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise ConfigError(
            f"config.workdir={directory!r}: {_gib(free)} free on its disk, less than the "
            f"{_gib(need_bytes)} {what} of this run needs"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
