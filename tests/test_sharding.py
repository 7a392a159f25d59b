"""Sharded execution on 8 fake CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import save_random_hf_checkpoint, tiny
from jax.sharding import PartitionSpec as P

from jaxrlvr.models import Qwen2, load_hf_checkpoint
from jaxrlvr.sharding import logical_to_spec, make_mesh, shard_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

EXPECTED_SPECS = {  # (1, 4, 2) mesh: fsdp=4, tensor=2, as LOGICAL_AXIS_RULES say
    ("embed",): P("tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
    ("final_norm", "scale"): P(None),
    # stacked decoder layers: the leading `layers` axis stays whole
    ("layers", "attn", "q_kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "k_kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "q_bias"): P(None, "tensor", None),
    ("layers", "attn", "o_kernel"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp", "gate_kernel"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_kernel"): P(None, "tensor", "fsdp"),
}


def _check_specs(model, mesh):
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, spec in EXPECTED_SPECS.items():
        arr = flat[key][...]
        assert arr.sharding.spec == spec, key
        assert arr.sharding.mesh.shape == mesh.shape
        shard = arr.addressable_shards[0].data.shape
        divisors = [
            1 if s is None else np.prod([mesh.shape[a] for a in np.atleast_1d(s)]) for s in spec
        ]
        assert shard == tuple(d // k for d, k in zip(arr.shape, divisors, strict=False)), key


def test_sharded_forward_equals_single_device(tmp_path):
    cfg = tiny(tie_word_embeddings=False)
    save_random_hf_checkpoint(cfg, tmp_path)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 16)))
    mask = jnp.ones((8, 16), jnp.int32).at[:3, :5].set(0)
    ref = load_hf_checkpoint(tmp_path)(ids, attention_mask=mask)

    mesh = make_mesh((1, 4, 2))
    model = load_hf_checkpoint(tmp_path, mesh=mesh)  # straight onto the shards
    _check_specs(model, mesh)
    gd, state = nnx.split(model)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, i, m: nnx.merge(gd, s)(i, attention_mask=m))(state, ids, mask)
    assert out.sharding.spec[0] == ("data", "fsdp") or out.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * np.abs(ref).max()
    )


def test_shard_model_places_existing_model():
    mesh = make_mesh((2, 2, 2))
    model = shard_model(Qwen2(tiny(), rngs=nnx.Rngs(0)), mesh)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    # stacked layers: the leading `layers` axis is not split
    assert model.layers.mlp.up_kernel[...].sharding.spec == P(None, "fsdp", "tensor")


def test_rules_replicate_dimensions_that_do_not_divide():
    mesh = {"data": 1, "fsdp": 4, "tensor": 4}
    # Qwen2.5-0.5B: 2 KV heads do not split 4 ways; 14 query heads neither.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (896, 2, 64), mesh) == P(
        "fsdp", None, None
    )
    assert logical_to_spec(("heads", "head_dim", "embed"), (14, 64, 896), mesh) == P(
        None, None, "fsdp"
    )
    assert logical_to_spec(("batch", "length"), (8, 3), mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", "length"), (8, 3), {"data": 2, "fsdp": 4}) == P(
        ("data", "fsdp"), None
    )


def test_mesh_shape_errors():
    assert make_mesh().shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        make_mesh((2, 4, 2))
    with pytest.raises(ValueError, match="must have 3 entries"):
        make_mesh((8,))


def test_device_order_makes_micro_batches_local_slices():
    """Rows laid out by `device_order`: micro-batch g of `split_rows` is logical rows
    g*m ... g*m + m - 1 in order, and slicing a mini-batch moves no data between devices."""
    from jax.sharding import NamedSharding

    from jaxrlvr.rl import grpo

    n, micro, shards = 64, 16, 8
    order = grpo.device_order(n, micro, shards)
    logical = np.arange(n) * 10
    parts = np.asarray(grpo.split_rows(logical[order], n // micro, shards))
    np.testing.assert_array_equal(parts, logical.reshape(n // micro, micro))
    np.testing.assert_array_equal(np.asarray(grpo.merge_rows(parts, shards)), logical[order])

    mesh = make_mesh((1, 8, 1))
    rows = NamedSharding(mesh, P("fsdp"))
    settings = grpo.LossSettings(
        temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=None,
        loss_agg="token-mean", kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
        logp_chunk=4, micro_batch=micro, mini_batches=2, batch_shards=shards,
    )  # fmt: skip
    x = jax.device_put(jnp.asarray(logical[order]), rows)
    fn = jax.jit(lambda b, k: grpo.mini_batch(b, k, settings), out_shardings=rows)
    hlo = fn.lower(x, 1).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
    mini = np.asarray(fn(x, 1))  # mini-batch 1 = logical micro-batches 2 and 3
    np.testing.assert_array_equal(
        np.asarray(grpo.split_rows(mini, 2, shards)), logical[32:].reshape(2, micro)
    )
