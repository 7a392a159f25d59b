"""Qwen2 / Qwen2.5 causal language model in Flax NNX.

One readable file: config and presets, RMSNorm, split-half rotary embeddings, grouped-query
attention with q/k/v biases, SwiGLU MLP, tied or untied LM head, and a KV cache for
incremental decoding in which every batch row sits at its own position.

The decoder layers are one module whose parameters carry a leading `layers` axis, run by
`jax.lax.scan`: the compiled program, its compile time and its compile memory do not grow
with depth. Activation checkpointing wraps the scanned layer with a `jax.checkpoint`
policy (`Qwen2Config.remat`: `none`, `full` or `dots`).

Numerics follow Hugging Face `Qwen2ForCausalLM`: norms, rotary tables and the attention
softmax are computed in float32; matmuls run in the compute `dtype`; logits are returned in
float32. Every parameter names its dimensions with logical axes (see `jaxrlvr.sharding`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlvr.models.attention import ATTENTION_BACKENDS, Visibility, attention
from jaxrlvr.sharding import constrain

Array = jax.Array

CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# What the backward pass keeps of a decoder layer's forward (`Qwen2Config.remat`):
# none: everything (no recompute); full: only the layer's input (recompute the whole layer);
# dots: the outputs of the weight matmuls (recompute norms, activations and attention).
MODEL_TYPES = ("qwen2", "qwen3")  # Hugging Face model_type: Qwen2 / Qwen2.5, Qwen3 dense
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def as_dtype(name: str | Any) -> jnp.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a dtype) -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[name])
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture (Hugging Face `config.json` fields) plus numerics of this port."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    # Qwen3 (dense) differs in three fields: per-head RMSNorm on q and k before RoPE, no
    # q/k/v bias, and a head dimension of its own (not hidden_size / heads).
    model_type: str = "qwen2"  # qwen2 | qwen3
    attention_bias: bool = True
    head_dim_: int | None = None  # None: hidden_size // num_attention_heads
    # numerics of this port (not part of the HF architecture)
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # activation checkpointing per decoder layer: none | full | dots
    attention: str = "auto"  # attention backend (`jaxrlvr.models.attention`)
    attention_block: int = 512  # key block of the blocked (flash) backend

    def __post_init__(self):
        if isinstance(self.remat, bool):  # older configs: True / False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention={self.attention!r}: expected one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.attention_block < 1:
            raise ValueError(f"attention_block={self.attention_block}: must be >= 1")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.head_dim_ is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        as_dtype(self.dtype), as_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden_size // self.num_attention_heads

    @property
    def qk_norm(self) -> bool:
        """Qwen3's RMSNorm of each head's query and key before RoPE."""
        return self.model_type == "qwen3"

    def replace(self, **kw) -> Qwen2Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> Qwen2Config:
        """Build from a parsed Hugging Face `config.json` (unknown keys are ignored): a
        Qwen2 / Qwen2.5 or a dense Qwen3 (`model_type`, else `architectures`)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type") or next(
            (t for t in MODEL_TYPES if any(a.lower().startswith(t + "for") for a in archs)), None
        )
        if model_type not in MODEL_TYPES or (
            archs and not any(a == f"{model_type.capitalize()}ForCausalLM" for a in archs)
        ):
            raise ValueError(
                f"unsupported architecture: model_type={d.get('model_type')!r}, "
                f"architectures={archs!r}; supported: Qwen2ForCausalLM (qwen2, Qwen2.5), "
                "Qwen3ForCausalLM (qwen3, dense)"
            )
        head_dim = d.get("head_dim")
        if (
            model_type == "qwen2"
            and head_dim is not None
            and head_dim * d["num_attention_heads"] != d["hidden_size"]
        ):
            raise ValueError(f"head_dim={head_dim} != hidden_size / num_attention_heads")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rope!r}; only default RoPE is ported")
        names = {f.name for f in dataclasses.fields(cls)}
        numerics = ("dtype", "param_dtype", "remat", "attention", "attention_block")
        kw = {k: v for k, v in d.items() if k in names and k not in numerics}
        if "rope_theta" not in d and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        kw["model_type"] = model_type
        kw["attention_bias"] = bool(d.get("attention_bias", model_type == "qwen2"))
        kw["head_dim_"] = head_dim if model_type == "qwen3" else None
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> Qwen2Config:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {os.fspath(path)!r} does not exist")
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no config.json in checkpoint directory {path}")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{file}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.Qwen2ForCausalLM` (or `Qwen3ForCausalLM`)
        reads."""
        extra = {"attention_bias": self.attention_bias} if self.model_type == "qwen3" else {}
        return extra | {
            "architectures": [f"{self.model_type.capitalize()}ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": self.param_dtype,
        }


# Numbers from the published Hugging Face configs of each model.
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(),
    "qwen2.5-1.5b": Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
    ),
    "qwen2.5-3b": Qwen2Config(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2,
    ),
    "qwen2.5-7b": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "qwen2.5-math-1.5b": Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "qwen2.5-math-7b": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=False,
    ),
    # Qwen3 base models (dense): Qwen/Qwen3-*-Base config.json.
    "qwen3-1.7b-base": Qwen2Config(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
        model_type="qwen3", attention_bias=False, head_dim_=128,
    ),
    "qwen3-4b-base": Qwen2Config(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        model_type="qwen3", attention_bias=False, head_dim_=128,
    ),
    "qwen3-8b-base": Qwen2Config(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        tie_word_embeddings=False, model_type="qwen3", attention_bias=False, head_dim_=128,
    ),
    # For tests: GQA with biases, small enough to compile in seconds.
    "tiny": Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    ),
    # Qwen3's layout at test size: q/k norms, no biases, head_dim 32 != 64 / 4.
    "tiny-qwen3": Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        model_type="qwen3", attention_bias=False, head_dim_=32,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> Qwen2Config:
    """A named architecture (`PRESETS`), optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class KVCache(NamedTuple):
    """Keys and values of every layer, `[L, B, S, K, Dh]` each; slot index == token position."""

    k: Array
    v: Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


# --------------------------------------------------------------------------- layers


def _param(rngs: nnx.Rngs, shape, names, dtype, scale: float | None) -> nnx.Param:
    """A parameter initialised N(0, scale^2) (or ones / zeros), tagged with logical axes."""
    if scale is None:
        value = jnp.ones(shape, dtype)
    elif scale == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(names))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), ("norm",), as_dtype(cfg.param_dtype), None)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # As Hugging Face: back to the input dtype, then scale.
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin `[B, T, Dh]` (float32) for split-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x `[B, T, N, Dh]`; rotate the two halves of the head dimension."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, h, k, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        pdt, std = as_dtype(cfg.param_dtype), 0.02
        self.cfg = cfg
        self.q_kernel = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pdt, std)
        self.k_kernel = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
        self.v_kernel = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pdt, std)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pdt, 0.0)
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pdt, 0.0)
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pdt, 0.0)
        self.o_kernel = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pdt, std)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg, rngs=rngs)

    def _project(self, x: Array, name: str) -> Array:
        """`x @ W` (+ bias) per head: `[B, T, D]` -> `[B, T, N, Dh]`."""
        dt = x.dtype
        out = jnp.einsum("btd,dhk->bthk", x, getattr(self, f"{name}_kernel")[...].astype(dt))
        if self.cfg.attention_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(dt)
        return out

    def __call__(
        self,
        x: Array,  # [B, T, D]
        cos: Array,  # [B, T, Dh]
        sin: Array,
        vis: Visibility,  # which key slots each query sees
        kv: KVCache | None,  # the whole cache ([L, B, S, K, Dh] x 2) or None
        layer: Array | None,  # [] int: this layer's index in the cache
        cache_index: Array | None,  # [B] slot of x[:, 0] in the cache
    ) -> tuple[Array, KVCache | None]:
        dt = x.dtype
        q, k, v = self._project(x, "q"), self._project(x, "k"), self._project(x, "v")
        if self.cfg.qk_norm:  # Qwen3: each head's query and key normalised before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))

        if kv is not None:  # write the new keys/values at each row's own slots, then read
            rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
            slots = cache_index[:, None] + jnp.arange(x.shape[1])  # [B, T]
            kv = KVCache(
                constrain(kv.k.at[layer, rows, slots].set(k.astype(kv.k.dtype)), CACHE_AXES),
                constrain(kv.v.at[layer, rows, slots].set(v.astype(kv.v.dtype)), CACHE_AXES),
            )
            k, v = kv.k[layer].astype(dt), kv.v[layer].astype(dt)  # [B, S, K, Dh]

        out = attention(q, k, v, vis, backend=self.cfg.attention, block=self.cfg.attention_block)
        return jnp.einsum("bthk,hkd->btd", out, self.o_kernel[...].astype(dt)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.hidden_size, cfg.intermediate_size, as_dtype(cfg.param_dtype)
        self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), pdt, 0.02)
        self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), pdt, 0.02)
        self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), pdt, 0.02)

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        gate = x @ self.gate_kernel[...].astype(dt)
        up = x @ self.up_kernel[...].astype(dt)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return hidden @ self.down_kernel[...].astype(dt)


class DecoderLayer(nnx.Module):
    """One decoder layer (`Qwen2.layers` holds all of them stacked: see `stack_layers`)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm = RMSNorm(d, eps, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, eps, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, vis, kv=None, layer=None, cache_index=None):
        attn_out, kv = self.attn(self.input_norm(x), cos, sin, vis, kv, layer, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return constrain(x, ("batch", "length", "act_embed")), kv


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One `DecoderLayer` whose every parameter stacks the layers' on a leading `layers` axis.

    The layers are built one by one first, so random initialisation draws exactly what an
    unstacked model would."""
    splits = [nnx.split(layer) for layer in layers]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        names = variables[0].get_metadata().get("logical_axes") or (None,) * variables[0].ndim
        value = jnp.stack([v[...] for v in variables])
        return variables[0].replace(value, logical_axes=("layers", *names))

    states = [state for _, state in splits]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(splits[0][0], stacked)


def scan_layers(
    layers: DecoderLayer,
    x: Array,  # [B, T, D]
    cos: Array,
    sin: Array,
    vis: Visibility,
    cache: KVCache | None = None,
    cache_index: Array | None = None,
    remat: str = "none",
) -> tuple[Array, KVCache | None]:
    """Run the stacked decoder layers in order with `jax.lax.scan`.

    Each step slices one layer's parameters off the `layers` axis. The cache, when given,
    rides in the carry and each layer writes its own slice in place.
    """
    graphdef, stacked = nnx.split(layers)

    def body(carry, params):
        h, kv, i = carry
        h, kv = nnx.merge(graphdef, params)(h, cos, sin, vis, kv, i, cache_index)
        return (h, kv, i + 1), None

    if cache is None and REMAT_POLICIES[remat] is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), stacked)
    return x, cache


# --------------------------------------------------------------------------- model


class Qwen2(nnx.Module):
    """`Qwen2ForCausalLM`: `model(input_ids, positions=None, attention_mask=None) -> logits`."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = as_dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt, 0.02)
        self.layers = stack_layers(
            [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt, 0.02
            )

    # -- pieces the trainer uses directly (chunked log-probs never build [B, T, V] at once)

    def head_matrix(self) -> tuple[Array, bool]:
        """The LM head as stored, never transposed: `(embedding [V, D], True)` when tied,
        else `(lm_head [D, V], False)` (the second item is `vocab_major`)."""
        if self.config.tie_word_embeddings:
            return self.embed[...], True
        return self.lm_head[...], False

    def hidden_states(
        self,
        input_ids: Array,  # [B, T] int
        positions: Array | None = None,  # [B, T] int
        attention_mask: Array | None = None,  # [B, T] {0, 1}
        *,
        segment_ids: Array | None = None,  # [B, T] int: packed sequences, 0 = padding
        cache: KVCache | None = None,
        cache_index: Array | None = None,  # [B] int: cache slot of input_ids[:, 0]
    ) -> tuple[Array, KVCache | None]:
        """Final-norm hidden states `[B, T, D]` (compute dtype) and the updated cache.

        Without a cache, attention is causal over the T tokens and stays within a segment:
        `segment_ids` packs several sequences per row (positions restart at 0 in each),
        `attention_mask` is the one-sequence case (positions default to `cumsum(mask) - 1`,
        so left padding is exact). With a cache, row b's tokens go to slots
        `cache_index[b] + t` and attend every slot up to their own; positions default to
        the slot index.
        """
        cfg = self.config
        b, t = input_ids.shape
        if cache is None:
            if segment_ids is not None and attention_mask is not None:
                raise ValueError("pass segment_ids or attention_mask, not both")
            if segment_ids is None:
                valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
                segment_ids = valid.astype(jnp.int32)
                if positions is None:
                    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
            elif positions is None:
                positions = segment_positions(segment_ids)
            columns = jnp.broadcast_to(jnp.arange(t), (b, t))
            vis = Visibility(segment_ids, segment_ids, columns, aligned=True)
        else:
            if cache_index is None:
                raise ValueError("cache_index is required with a cache")
            slots = cache_index[:, None] + jnp.arange(t)  # [B, T]
            if positions is None:
                positions = slots
            ones = jnp.ones((b, cache.max_length), jnp.int32)
            seen = ones[:, :t] if attention_mask is None else attention_mask.astype(jnp.int32)
            # T == S: the tokens fill the cache from slot 0 (the only way they fit).
            vis = Visibility(seen, ones, slots, aligned=t == cache.max_length)

        dt = as_dtype(cfg.dtype)
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        x = constrain(x, ("batch", "length", "act_embed"))
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

        x, cache = scan_layers(self.layers, x, cos, sin, vis, cache, cache_index, cfg.remat)
        return self.final_norm(x), cache

    def logits(self, hidden: Array) -> Array:
        """`[B, T, D]` hidden states -> `[B, T, V]` float32 logits.

        With a tied head and one position per row (sampling), the product is formed as
        `[V, B]`, reading the embedding in its stored layout, and transposed after a
        barrier: XLA:CPU otherwise emits the `[B, V]` product at 1.45x the time (6.2 vs
        4.3 ms at V=32768, D=512, B=16; docs/benchmarks.md)."""
        w, vocab_major = self.head_matrix()
        w = w.astype(hidden.dtype)
        f32 = jnp.float32
        if vocab_major and hidden.shape[1] == 1:
            vb = jnp.einsum("vd,bd->vb", w, hidden[:, 0], preferred_element_type=f32)
            logits = jax.lax.optimization_barrier(vb).T[:, None]  # [B, 1, V]
        else:
            spec = "btd,vd->btv" if vocab_major else "btd,dv->btv"
            logits = jnp.einsum(spec, hidden, w, preferred_element_type=f32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Logits `[B, T, V]` (float32); with a cache, `(logits, new_cache)`."""
        hidden, new_cache = self.hidden_states(
            input_ids,
            positions,
            attention_mask,
            segment_ids=segment_ids,
            cache=cache,
            cache_index=cache_index,
        )
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """A zero KV cache of `max_length` slots per row (compute dtype by default)."""
        return init_cache(self.config, batch_size, max_length, dtype)


def segment_positions(segment_ids: Array) -> Array:
    """Each token's position within its segment `[B, T]` (segments are contiguous runs)."""
    t = segment_ids.shape[1]
    columns = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return columns - jax.lax.cummax(jnp.where(starts, columns, 0), axis=1)


def with_compute_dtype(model: Qwen2, dtype: str) -> Qwen2:
    """A view of `model` computing in `dtype` (activations, and the weights as they enter
    each matmul), sharing its parameters: the sampler's policy at `rollout.dtype`."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    view.config = model.config.replace(dtype=dtype)
    return view


def init_cache(cfg: Qwen2Config, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    dt = as_dtype(cfg.dtype if dtype is None else dtype)
    shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))
