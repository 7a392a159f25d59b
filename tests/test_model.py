"""The Qwen2 port against Hugging Face `transformers`, and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import TEST_CONFIGS, save_random_hf_checkpoint, tiny, torch_logits

from jaxrlvr.models import PRESETS, Qwen2, Qwen2Config, load_hf_checkpoint, preset

# Max |logit error| relative to max |reference logit|, float32.
FP32_RTOL = 1e-5
# bfloat16 compute (float32 params) vs float32: same relative measure (documented in docs/model.md).
BF16_RTOL = 3e-2


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(TEST_CONFIGS))
def pair(request, tmp_path_factory):
    """(our model, the Hugging Face model) sharing random weights, for one test config."""
    cfg = tiny(**TEST_CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf = save_random_hf_checkpoint(cfg, path, seed=len(request.param))
    return load_hf_checkpoint(path), hf


def test_parity_with_transformers(pair):
    model, hf = pair
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (3, 17))
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = torch_logits(hf, ids)
    assert ours.shape == ref.shape == (3, 17, model.config.vocab_size)
    assert rel_err(ours, ref) <= FP32_RTOL


def test_left_padded_batch_equals_per_row(pair):
    model, _ = pair
    rng = np.random.RandomState(1)
    lengths = [5, 11, 8]
    t = max(lengths)
    ids = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    rows = [rng.randint(1, model.config.vocab_size, n) for n in lengths]
    for i, row in enumerate(rows):
        ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
    batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for i, row in enumerate(rows):
        alone = np.asarray(model(jnp.asarray(row[None])))[0]
        assert rel_err(batch[i, t - len(row) :], alone) <= FP32_RTOL


def test_cached_decoding_equals_full_forward(pair):
    """Prefill rows of different lengths, then decode one token at a time per row."""
    model, _ = pair
    rng = np.random.RandomState(2)
    prompt_lens, steps, max_len = np.array([3, 7]), 6, 32
    seqs = rng.randint(0, model.config.vocab_size, (2, prompt_lens.max() + steps))

    step = jax.jit(lambda st, ids, cache, idx: nnx.merge(gd, st)(ids, cache=cache, cache_index=idx))
    gd, st = nnx.split(model)
    cache = model.init_cache(2, max_len)
    # Right-padded prefill of both rows at slot 0; padding slots are later overwritten.
    prefill = np.zeros((2, prompt_lens.max()), np.int32)
    for i, n in enumerate(prompt_lens):
        prefill[i, :n] = seqs[i, :n]
    logits, cache = step(st, jnp.asarray(prefill), cache, jnp.zeros(2, jnp.int32))
    got = [[np.asarray(logits[i, n - 1])] for i, n in enumerate(prompt_lens)]
    for s in range(steps):
        pos = prompt_lens + s
        tokens = seqs[np.arange(2), pos][:, None]
        logits, cache = step(st, jnp.asarray(tokens), cache, jnp.asarray(pos, jnp.int32))
        for i in range(2):
            got[i].append(np.asarray(logits[i, 0]))
    for i, n in enumerate(prompt_lens):
        full = np.asarray(model(jnp.asarray(seqs[i : i + 1, : n + steps])))[0]
        assert rel_err(np.stack(got[i]), full[n - 1 :]) <= FP32_RTOL


def test_bfloat16_compute_close_to_float32(tmp_path):
    cfg = tiny()
    save_random_hf_checkpoint(cfg, tmp_path)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 24)))
    fp32 = load_hf_checkpoint(tmp_path)(ids)
    bf16 = load_hf_checkpoint(tmp_path, dtype="bfloat16", param_dtype="float32")(ids)
    bf16_params = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert bf16_params.embed[...].dtype == jnp.bfloat16
    assert bf16.dtype == jnp.float32  # logits always float32
    err = rel_err(bf16, fp32)
    assert 0 < err <= BF16_RTOL
    assert rel_err(bf16_params(ids), fp32) <= BF16_RTOL


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_identical_values_and_gradients(remat):
    cfg = tiny()
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 9)))

    def loss_and_grad(remat):
        model = Qwen2(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])  # noqa: E731
        return nnx.value_and_grad(loss)(model)

    (l0, g0), (l1, g1) = loss_and_grad("none"), loss_and_grad(remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_setting_is_checked():
    assert tiny(remat=True).remat == "full" and tiny(remat=False).remat == "none"
    with pytest.raises(ValueError, match="remat='some'"):
        tiny(remat="some")


def test_layers_are_stacked_and_scanned():
    """One stacked layer module: the program does not grow with depth."""
    shallow, deep = tiny(num_hidden_layers=2), tiny(num_hidden_layers=12)
    ids = jnp.zeros((1, 8), jnp.int32)

    def hlo_size(cfg):
        gd, st = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
        return len(jax.jit(lambda s: nnx.merge(gd, s)(ids)).lower(st).as_text())

    model = Qwen2(deep, rngs=nnx.Rngs(0))
    assert model.layers.mlp.up_kernel[...].shape == (12, 64, 128)
    assert model.init_cache(2, 16).k.shape == (12, 2, 16, 2, 16)
    assert hlo_size(deep) < 1.05 * hlo_size(shallow)


def test_presets_match_published_shapes():
    assert preset("qwen2.5-0.5b").num_key_value_heads == 2
    p7 = preset("qwen2.5-math-7b")
    assert (p7.hidden_size, p7.num_hidden_layers, p7.vocab_size, p7.head_dim) == (
        3584,
        28,
        152064,
        128,
    )
    assert not p7.tie_word_embeddings and p7.rope_theta == 10000.0
    for name, cfg in PRESETS.items():
        assert cfg.hidden_size % cfg.num_attention_heads == 0 or cfg.head_dim_, name
    q8 = preset("qwen3-8b-base")
    assert (q8.hidden_size, q8.num_hidden_layers, q8.head_dim, q8.num_key_value_heads) == (
        4096, 36, 128, 8,
    )  # fmt: skip
    assert q8.qk_norm and not q8.attention_bias and not q8.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        preset("qwen9")


def test_config_rejects_other_architectures():
    with pytest.raises(ValueError, match="unsupported architecture: model_type='llama'.*"
                       "supported: Qwen2ForCausalLM .*Qwen3ForCausalLM"):  # fmt: skip
        Qwen2Config.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="unsupported architecture: model_type='qwen3_moe'"):
        Qwen2Config.from_hf_dict({"model_type": "qwen3_moe"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny(num_key_value_heads=3)
