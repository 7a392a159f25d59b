"""Hugging Face checkpoints: `config.json` + `*.safetensors` <-> a sharded `Qwen2`.

Loading never builds the model on one host first: the model is created abstractly
(`nnx.eval_shape`), then each tensor is memory-mapped from its safetensors file, converted
to this port's layout, and placed shard by shard onto its `NamedSharding` with
`jax.make_array_from_callback`. Peak host memory is one tensor. The port stacks the
decoder layers (`model.layers.{i}.*` of every i become one parameter with a leading
`layers` axis): each layer's tensor is placed on its own, then stacked on the devices.

Saving writes what `transformers.Qwen2ForCausalLM.from_pretrained` reads, atomically (a
temporary directory renamed into place), so a trained policy can be evaluated by any
Hugging Face-compatible tool.

A directory this port cannot load raises `ModelDirError` (a `ConfigError`: the command
lines print it as one `error:` line and exit 2) naming the file and the fault, before
any weight is read: `check_hf_checkpoint` runs those checks alone, from the headers. A
write that fails during an export raises `ExportError` naming the export and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlvr.errors import ConfigError
from jaxrlvr.models.qwen2 import Qwen2, Qwen2Config, as_dtype
from jaxrlvr.sharding import LOGICAL_AXIS_RULES, LogicalRules, logical_axes_of, named_sharding

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class ModelDirError(ConfigError):
    """A Hugging Face model directory this port cannot load; names the file and the fault."""


class ExportError(OSError):
    """An export that could not be written; nothing of it is left behind."""


def _read_json(file: str):
    """The parsed JSON of `file`; invalid JSON names the file, line and column."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelDirError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def read_config(path: str | os.PathLike, **overrides) -> Qwen2Config:
    """The `Qwen2Config` of a model directory's `config.json` (with `overrides`).

    Raises `ModelDirError` for a missing directory or file, invalid JSON, and an
    architecture other than Qwen2 (naming the one found and the one supported).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelDirError(f"checkpoint directory {path!r} does not exist")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelDirError(f"{file}: no config.json in checkpoint directory {path}")
    d = _read_json(file)
    if not isinstance(d, dict):
        raise ModelDirError(f"{file}: expected a JSON object, found a {type(d).__name__}")
    try:
        return Qwen2Config.from_hf_dict(d, **overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelDirError(f"{file}: {e}") from None


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class _TensorRef:
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    def read(self) -> np.ndarray:
        dtype = np.dtype(_ST_DTYPES[self.dtype])
        if not self.shape or 0 in self.shape:
            return np.zeros(self.shape, dtype)
        return np.memmap(self.file, dtype=dtype, mode="r", offset=self.offset, shape=self.shape)


def _read_header(file: str) -> dict[str, _TensorRef]:
    """The tensors a safetensors file holds, checked against the file's size: a truncated
    or corrupt file raises `ModelDirError` naming what is missing."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelDirError(f"{file}: truncated safetensors file: {size} bytes, no header")
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            raise ModelDirError(
                f"{file}: truncated safetensors file: its header needs {8 + n} bytes, the "
                f"file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{file}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{file}: corrupt safetensors header: not a JSON object")
    refs, ends = {}, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelDirError(
                f"{file}: corrupt safetensors header: bad entry for tensor {name!r}"
            ) from None
        if dtype in _ST_DTYPES:  # others are refused only if the model needs them
            nbytes = int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize
            if end - begin != nbytes:
                raise ModelDirError(
                    f"{file}: corrupt safetensors header: tensor {name!r} of shape "
                    f"{list(shape)} {dtype} needs {nbytes} bytes, its data_offsets span "
                    f"{end - begin}"
                )
        refs[name] = _TensorRef(file, dtype, shape, 8 + n + begin)
        ends[name] = 8 + n + end
    if cut := [name for name, end in ends.items() if end > size]:
        whole = max(ends.values())
        raise ModelDirError(
            f"{file}: truncated safetensors file: {size} of its {whole} bytes "
            f"({whole - size} missing); {len(cut)} tensor(s) cut short, e.g. {cut[0]!r}"
        )
    return refs


def _index_checkpoint(path: str) -> dict[str, _TensorRef]:
    """Every tensor of a single-file or sharded (`model.safetensors.index.json`) checkpoint."""
    if not os.path.isdir(path):
        raise ModelDirError(f"checkpoint directory {path!r} does not exist")
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_file):
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ModelDirError(f'{index_file}: no "weight_map" of tensor names to files')
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise ModelDirError(f"{index_file} lists {name}, which is missing from {path}")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ModelDirError(f"no *.safetensors files in checkpoint directory {path}")
    refs: dict[str, _TensorRef] = {}
    for name in files:
        refs.update(_read_header(os.path.join(path, name)))
    return refs


def _write_safetensors(file: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]):
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with _naming(file), open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


@contextlib.contextmanager
def _naming(file: str):
    """An `OSError` inside names `file` (a failed write names none) for `ExportError`."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or file
        raise


# --------------------------------------------------------------------------- name/layout map


@dataclass(frozen=True)
class _Layout:
    """How one parameter of this port is stored in a Hugging Face checkpoint."""

    name: str
    hf_shape: tuple[int, ...]
    to_port: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _hf_layouts(path: tuple, cfg: Qwen2Config) -> list[_Layout]:
    """The Hugging Face tensors of one parameter: one per decoder layer for a stacked one."""
    if path[0] == "layers":
        return [_hf_layout(("layers", i, *path[1:]), cfg) for i in range(cfg.num_hidden_layers)]
    return [_hf_layout(path, cfg)]


def _hf_layout(path: tuple, cfg: Qwen2Config) -> _Layout:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, k, v = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    if path == ("embed",):
        return _Layout("model.embed_tokens.weight", (v, d), _identity, _identity)
    if path == ("final_norm", "scale"):
        return _Layout("model.norm.weight", (d,), _identity, _identity)
    if path == ("lm_head",):
        return _Layout("lm_head.weight", (v, d), _transpose, _transpose)
    _, i, block, leaf, *_ = path  # ('layers', i, block, leaf[, 'scale'])
    prefix = f"model.layers.{i}"
    if block == "input_norm":
        return _Layout(f"{prefix}.input_layernorm.weight", (d,), _identity, _identity)
    if block == "post_attn_norm":
        return _Layout(f"{prefix}.post_attention_layernorm.weight", (d,), _identity, _identity)
    if block == "mlp":
        proj = leaf.removesuffix("_kernel")
        shape = (d, f) if proj == "down" else (f, d)
        return _Layout(f"{prefix}.mlp.{proj}_proj.weight", shape, _transpose, _transpose)
    if block == "attn" and leaf in ("q_norm", "k_norm"):  # Qwen3: per-head RMSNorm
        return _Layout(f"{prefix}.self_attn.{leaf}.weight", (hd,), _identity, _identity)
    if block == "attn":
        proj, kind = leaf.split("_")
        heads = h if proj in ("q", "o") else k
        name = f"{prefix}.self_attn.{proj}_proj.{'bias' if kind == 'bias' else 'weight'}"
        if kind == "bias":
            return _Layout(
                name, (heads * hd,), lambda x: x.reshape(heads, hd), lambda x: x.reshape(-1)
            )
        if proj == "o":  # [D, H*Dh] <-> [H, Dh, D]
            return _Layout(
                name, (d, h * hd), lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(-1, d).T
            )
        return _Layout(  # [N*Dh, D] <-> [D, N, Dh]
            name,
            (heads * hd, d),
            lambda x: x.T.reshape(d, heads, hd),
            lambda x: x.reshape(d, -1).T,
        )
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(map(str, path))}")


# --------------------------------------------------------------------------- load / save


def check_hf_checkpoint(path: str | os.PathLike) -> Qwen2Config:
    """Check a model directory without reading any weight; return its config.

    `config.json` must be a Qwen2 architecture, every safetensors file whole (its header
    and the data it lists within the file), and every tensor the config needs present
    with its shape. Raises `ModelDirError` naming the file and the fault.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    _plan(path, cfg, _index_checkpoint(path))
    return cfg


def _plan(path: str, cfg: Qwen2Config, refs: dict[str, _TensorRef]):
    """The abstract model (graphdef, flat state) and, per parameter, the tensors that fill
    it; `ModelDirError` for a tensor missing, of another shape, or of an unreadable dtype."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)

    plan, missing = [], []
    for key, var in flat:
        parts = []
        for layout in _hf_layouts(key, cfg):
            ref = refs.get(layout.name)
            if ref is None:
                missing.append(layout.name)
                continue
            if ref.shape != layout.hf_shape:
                raise ModelDirError(
                    f"{path}: tensor {layout.name!r} in {os.path.basename(ref.file)} has shape "
                    f"{list(ref.shape)}, expected {list(layout.hf_shape)} for this config.json"
                )
            if ref.dtype not in _ST_DTYPES:
                raise ModelDirError(
                    f"{ref.file}: tensor {layout.name!r} has dtype {ref.dtype}, which this "
                    f"port does not read ({', '.join(_ST_DTYPES)})"
                )
            parts.append((layout, ref))
        plan.append((key, var, parts))
    if missing:
        raise ModelDirError(
            f"{path}: {len(missing)} tensor(s) missing from the checkpoint: "
            + ", ".join(repr(n) for n in sorted(missing)[:4])
            + (", ..." if len(missing) > 4 else "")
        )
    return graphdef, flat, plan


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules = LOGICAL_AXIS_RULES,
    **config_overrides,
) -> Qwen2:
    """Load a Hugging Face Qwen2 checkpoint directory into a (sharded) `Qwen2`.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`, else
    float32). With `mesh`, every tensor goes straight to its shards; without, to the
    default device. Raises `ModelDirError`, before reading any weights, for the faults
    `check_hf_checkpoint` names.
    """
    path = os.fspath(path)
    if dtype is not None:
        config_overrides["dtype"] = dtype
    config_overrides.setdefault("param_dtype", param_dtype or dtype or "float32")
    cfg = read_config(path, **config_overrides)
    refs = _index_checkpoint(path)
    graphdef, flat, plan = _plan(path, cfg, refs)
    unused = set(refs) - {layout.name for *_, parts in plan for layout, _ in parts}
    unused -= {"lm_head.weight"}
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        log.warning(
            "%s: ignoring %d unused tensors, e.g. %s", path, len(unused), sorted(unused)[:3]
        )

    target = np.dtype(as_dtype(cfg.param_dtype))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for key, var, parts in plan:
        sharding = default
        names = logical_axes_of(var)
        if mesh is not None:
            sharding = named_sharding(mesh, names, var.shape, rules)

        def host(part):
            layout, ref = part
            return np.asarray(layout.to_port(ref.read()), dtype=target)

        if key[0] != "layers":
            var.set_value(_place(host(parts[0]), sharding))
            continue
        layer_sharding = default  # one layer's tensor: the stacked sharding less its first axis
        if mesh is not None:
            layer_sharding = named_sharding(mesh, names[1:], var.shape[1:], rules)
        layers = [_place(host(part), layer_sharding) for part in parts]
        var.set_value(_stack(sharding)(*layers))
    tensors = sum(len(parts) for *_, parts in plan)
    log.info("loaded %s: %d tensors, %s params", path, tensors, f"{_num_params(flat):,}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host copy: each device receives only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _stack(sharding: jax.sharding.Sharding):
    """A jitted `stack` of per-layer arrays onto the stacked parameter's sharding."""
    return jax.jit(lambda *layers: jax.numpy.stack(layers), out_shardings=sharding)


def _num_params(flat) -> int:
    return sum(int(np.prod(v.shape)) for _, v in flat)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf_checkpoint(
    model: Qwen2,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write `model` as a Hugging Face `Qwen2ForCausalLM` checkpoint directory.

    `dtype` is the stored dtype (default: the model's `param_dtype`). Tensors are split
    into several files with an index when they exceed `max_shard_bytes`. `tokenizer`
    (a `transformers` tokenizer) is saved alongside if given. In multi-process runs every
    process must call this (parameters are gathered); only process 0 writes.
    """
    path = os.fspath(path)
    cfg = model.config
    out_dtype = np.dtype(as_dtype(dtype or cfg.param_dtype))
    tensors: dict[str, np.ndarray] = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = _to_host(var[...])
        layouts = _hf_layouts(key, cfg)
        pieces = value if key[0] == "layers" else [value]  # a stacked parameter: per layer
        for layout, piece in zip(layouts, pieces, strict=True):
            tensors[layout.name] = np.ascontiguousarray(layout.to_hf(piece).astype(out_dtype))
    if jax.process_index() != 0:
        return

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes

    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        _write_export(tmp, shards, cfg.to_hf_dict() | {"dtype": str(out_dtype)}, tokenizer)
        _swap_into_place(tmp, path)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, ExportError):
            raise _export_error(path, tmp, e) from e
        raise
    log.info("saved Hugging Face checkpoint to %s (%d files)", path, len(shards))


def _write_export(tmp: str, shards: list[dict[str, np.ndarray]], hf_config: dict, tokenizer):
    """Every file of the export into the (new, empty) directory `tmp`."""
    meta = {"format": "pt"}
    if len(shards) == 1:
        _write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0], meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(os.path.join(tmp, file), shard, meta)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(a.nbytes for shard in shards for a in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(os.path.join(tmp, INDEX_FILE), index)
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
    _write_json(os.path.join(tmp, "generation_config.json"), gen)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _write_json(file: str, obj) -> None:
    with _naming(file), open(file, "w") as f:
        json.dump(obj, f, indent=2)


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename the written directory `tmp` to `path`; an older export there is replaced
    whole, or kept if the rename fails."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = tmp + ".old"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_error(path: str, tmp: str | None, e: OSError) -> ExportError:
    """One line: the export, the cause (with its errno name) and the file being written."""
    cause = e.strerror or str(e)
    if e.errno in errno.errorcode:
        cause += f" ({errno.errorcode[e.errno]})"
    if e.filename and tmp and os.path.abspath(e.filename).startswith(os.path.abspath(tmp)):
        cause += f" writing {os.path.relpath(e.filename, tmp)}"
    return ExportError(f"cannot write the Hugging Face export {path}: {cause}; {path} is unchanged")
