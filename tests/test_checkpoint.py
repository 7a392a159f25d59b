"""Hugging Face checkpoint loading and export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import save_random_hf_checkpoint, tiny, torch_logits

from jaxrlvr.models import Qwen2, load_hf_checkpoint, save_hf_checkpoint


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip_is_exact(tmp_path, tied):
    cfg = tiny(tie_word_embeddings=tied)
    model = Qwen2(cfg, rngs=nnx.Rngs(7))
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # non-trivial biases and norms
        v.set_value(
            v[...] + 0.1 * jnp.asarray(np.random.RandomState(v.size).randn(*v.shape), v.dtype)
        )
    save_hf_checkpoint(model, tmp_path / "hf")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
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
    with pytest.raises(ValueError, match="config.json: not a Qwen2 checkpoint"):
        load_hf_checkpoint(path)

    (path / "config.json").write_text("{\n  'bad': 1\n}")
    with pytest.raises(ValueError, match=r"config.json:2: invalid JSON"):
        load_hf_checkpoint(path)

    (path / "config.json").write_text(json.dumps(config))
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
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
