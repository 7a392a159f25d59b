"""Does a training step fit? `python -m jaxrlvr.plan --config=configs/steer.py:qwen2.5-math-7b
--topology=v5p-8 [--mesh=1,4,1] [--config.x=y ...] [--json=plan.json]`.

Compiles every jitted program of a training step ahead of time, at the config's real
shapes, for a TPU slice (its devices come from libtpu's topology description, so no TPU
and no weights are needed; `pip install -e ".[tpu]"`) or for the local devices, and
prints per program the per-chip memory XLA allocates (arguments, temporaries, outputs)
plus the buffers the trainer keeps alive meanwhile, against the chip's HBM. Exits 1 when
a program does not fit, naming it and the smallest `train.micro_batch_sequences` /
`rollout.max_slots` / mesh change that would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from absl.flags import FLAGS
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from jaxrlvr import config as config_lib
from jaxrlvr import roofline
from jaxrlvr.models.qwen2 import Qwen2, Qwen2Config, as_dtype, with_compute_dtype
from jaxrlvr.rl import grpo, programs
from jaxrlvr.sampling import engine as engine_lib
from jaxrlvr.sharding import MESH_AXES, batch_shards

GiB = 2**30


class PlanError(ValueError):
    """Bad planner input (slice, mesh or model); the message is one line."""


# --------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class Generation:
    topology: str  # prefix of libtpu's topology names
    hbm_gib: float  # per chip
    cores_per_chip: int  # the number in a gcloud accelerator name counts TensorCores
    dims: int  # torus dimensions


GENERATIONS = {
    "v4": Generation("v4", 32, 2, 3),
    "v5p": Generation("v5p", 95, 2, 3),
    "v5litepod": Generation("v5e", 16, 1, 2),
    "v5e": Generation("v5e", 16, 1, 2),
    "v6e": Generation("v6e", 32, 1, 2),
}
_TORUS = {  # chips -> the slice's torus shape
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given
    topology: str  # libtpu's name, e.g. "v5p:2x2x1"
    chips: int
    hbm_gib: float  # per chip

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]


def accepted_slices() -> list[str]:
    out = []
    for name, g in GENERATIONS.items():
        out += [f"{name}-{chips * g.cores_per_chip}" for chips in _TORUS[g.dims]]
    return out


def parse_slice(name: str) -> Slice:
    """A gcloud accelerator type (`v5p-8`, `v5litepod-16`, `v6e-8`) or a libtpu topology
    (`v5p:2x2x1`)."""
    gen_name, sep, size = name.partition(":") if ":" in name else name.rpartition("-")
    gen = GENERATIONS.get(gen_name)
    if gen is None or not sep or not size:
        raise PlanError(
            f"--topology={name!r}: unknown TPU slice; accepted: {', '.join(accepted_slices())} "
            "or <generation>:<torus>, e.g. v5p:2x2x2"
        )
    if ":" in name:
        dims = size.split("x")
        if len(dims) != gen.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise PlanError(f"--topology={name!r}: a {gen_name} torus has {gen.dims} sizes")
        return Slice(name, f"{gen.topology}:{size}", math.prod(map(int, dims)), gen.hbm_gib)
    chips = int(size) // gen.cores_per_chip if size.isdigit() else 0
    shapes = _TORUS[gen.dims]
    if chips not in shapes or int(size) % gen.cores_per_chip:
        raise PlanError(
            f"--topology={name!r}: no {gen_name} slice of that size; accepted: "
            + ", ".join(s for s in accepted_slices() if s.startswith(gen_name + "-"))
        )
    return Slice(name, f"{gen.topology}:{shapes[chips]}", chips, gen.hbm_gib)


def slice_devices(s: Slice) -> list:
    """The devices of a slice, from libtpu's topology description (no TPU needed)."""
    # Compiling only: no lock on the (absent) chips, so plans may run side by side; quiet logs.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.topology.replace(":", "-"))
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=s.topology).devices)
    except Exception as e:  # libtpu missing or the name unknown to it
        raise PlanError(
            f"--topology={s.name!r}: cannot describe TPU topology {s.topology!r} ({e}); "
            'the TPU compiler comes with `pip install -e ".[tpu]"`'
        ) from None


def parse_mesh(spec: str | None, default, devices: int) -> tuple[int, int, int]:
    """`1,4,1` (or the config's `mesh.shape`) resolved against the device count."""
    shape = [int(x) for x in spec.split(",")] if spec else list(default)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or min(shape) < -1 or 0 in shape:
        raise PlanError(f"--mesh={spec or default}: expected 3 sizes over {MESH_AXES}, e.g. 1,4,1")
    if -1 in shape:
        known = math.prod(x for x in shape if x != -1)
        shape[shape.index(-1)] = devices // known if devices % known == 0 else 0
    if math.prod(shape) != devices:
        raise PlanError(
            f"mesh {tuple(spec.split(',') if spec else default)} does not cover the "
            f"{devices} devices of the slice; the product of its sizes must be {devices}"
        )
    return tuple(shape)


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Row:
    """One compiled program: per-chip bytes, FLOPs and compile seconds."""

    name: str
    arguments: int
    temp: int
    outputs: int  # outputs not aliased to (donated) arguments
    resident: int  # other buffers the trainer keeps alive while it runs
    flops: float  # model FLOPs per chip of one call (see `model_flops`)
    compile_s: float
    bytes_accessed: float = 0.0  # per chip and call, XLA's cost analysis
    collective_bytes: float = 0.0  # per chip and call, the FSDP gathers (`roofline`)

    @property
    def total(self) -> int:
        return self.arguments + self.temp + self.outputs + self.resident


def _nbytes(tree) -> int:
    """Per-device bytes of a tree of sharded abstract arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            shape = (*shape, 2)  # a threefry key: two uint32 words
            itemsize = 4
        else:
            itemsize = jnp.dtype(x.dtype).itemsize
        total += math.prod(shape) * itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def model_flops(
    cfg: Qwen2Config, tokens: int, context: int, passes: float, head_passes: float | None = None
) -> float:
    """2 x matmul parameters x tokens, plus attention (4 x T x D per token and layer, the
    full causal square as the kernels compute it), times `passes` for the decoder layers
    (1 forward; 3 forward + backward; 4 with layer recompute) and `head_passes` for the
    LM head (default `passes`; 4 with `model.logp_remat`)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * q * 2 + d * kv * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    layers = 2 * L * per_layer + 4 * L * context * q
    head = 2 * d * cfg.vocab_size
    head_passes = passes if head_passes is None else head_passes
    return float(tokens * (passes * layers + head_passes * head))


@dataclasses.dataclass
class Planner:
    """Compiles the programs of one config on one mesh; `run` gives the rows."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    hbm_bytes: int | None
    log: Callable[[str], Any] = print
    chips: int = 1  # chips of the slice (for chip-hours)

    def __post_init__(self):
        c = self.config
        self.cfg = config_lib.model_architecture(c)
        model = nnx.eval_shape(lambda: Qwen2(self.cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        # The sampler's copy: the same shapes at rollout.dtype.
        self.sampler_cfg = self.cfg.replace(dtype=config_lib.rollout_dtype(c))
        self.engine_graphdef, _ = nnx.split(with_compute_dtype(model, self.sampler_cfg.dtype))
        self.mini_batches = config_lib.mini_batches_per_step(c)
        self.tx, _ = grpo.make_optimizer(c.optim, c.train.steps, config_lib.updates_per_step(c))
        self.num_sequences = c.train.prompts_per_step * c.rollout.n
        state = programs.abstract_train_state(self.params, self.tx, c)
        self.state = _abstract(state, programs.train_state_shardings(state, self.tx, self.mesh))

    # -- helpers

    def _compile(
        self, name: str, program: tuple, resident: int, flops: float, collective: float = 0.0
    ) -> Row:
        """Compile `fn(*args)` (abstract, sharded args) and measure it. A program XLA
        refuses for lack of HBM is a row too, with the temporaries it asked for."""
        fn, args = program
        t0 = time.perf_counter()
        moved = 0.0
        with jax.set_mesh(self.mesh):
            lowered = fn.lower(*args)
            try:
                compiled = lowered.compile()
                m, moved = compiled.memory_analysis(), roofline.bytes_accessed(compiled)
                sizes = dict(
                    arguments=int(m.argument_size_in_bytes),
                    temp=int(m.temp_size_in_bytes),
                    outputs=int(m.output_size_in_bytes - m.alias_size_in_bytes),
                )
            except jax.errors.JaxRuntimeError as e:
                found = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
                if "RESOURCE_EXHAUSTED" not in str(e) or not found:
                    raise
                arrays = [a for a in jax.tree.leaves(args) if hasattr(a, "sharding")]
                temp = int(float(found.group(1)) * GiB)
                sizes = dict(arguments=_nbytes(arrays), temp=temp, outputs=0)
                self.log(f"  {name}: XLA ran out of HBM: {str(e).splitlines()[0][:160]}")
        seconds = time.perf_counter() - t0
        row = Row(
            name=name, **sizes, resident=resident, flops=flops, compile_s=seconds,
            bytes_accessed=moved, collective_bytes=collective,
        )  # fmt: skip
        self.log(f"  compiled {name:<16} {seconds:6.1f} s   {row.total / GiB:8.2f} GiB per chip")
        return row

    def _settings(self, c) -> grpo.LossSettings:
        return grpo.LossSettings.from_config(c, batch_shards=batch_shards(self.mesh))

    # -- the programs

    def train_rows(self, c: ml_collections.ConfigDict, only: set[str] | None = None) -> list[Row]:
        s = self._settings(c)
        state = self.state  # the abstract, sharded state: trials change no part of it
        fns = programs.build(self.graphdef, self.tx, s, self.mesh, state, self.num_sequences)
        rows_sh, repl = fns.batch_sharding, fns.replicated
        n, p, r = self.num_sequences, c.data.max_prompt_len, c.rollout.max_new_tokens
        batch = programs.abstract_batch(n, p, r, rows_sh)
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=repl)  # noqa: E731
        params_bytes = _nbytes(state.params)
        engine_bytes = _nbytes(self._engine_params())
        ref_bytes = params_bytes if c.algo.kl_coef > 0 else 0
        chips = self.mesh.size
        tokens, ctx = n * (p + r), p + r
        passes = 4.0 if c.model.remat != "none" else 3.0
        head_passes = 4.0 if s.logp_remat else 3.0
        resp = jax.ShapeDtypeStruct((n, r), jnp.float32, sharding=rows_sh)
        inputs = jax.eval_shape(
            lambda *a: grpo.step_inputs(*a, s), state, resp, resp, scalar(jnp.int32)
        )  # the step's scalars, replicated
        inputs = jax.tree.map(lambda x: scalar(x.dtype), inputs)
        others = engine_bytes + ref_bytes  # the sampler's weights, the frozen reference
        check_copy = params_bytes if c.diagnostics.entropy_check_every else 0
        todo = {
            "policy_pass": (
                (fns.policy_pass, (state.params, batch)),
                _nbytes(state) - params_bytes + others,
                model_flops(self.cfg, tokens, ctx, 1) / chips,
            ),
            "update": (  # one call per mini-batch
                (fns.update, (state, batch, scalar(jnp.int32), inputs)),
                others + check_copy,
                model_flops(self.cfg, tokens // self.mini_batches, ctx, passes, head_passes)
                / chips,
            ),
            "step_inputs": (
                (fns.step_inputs, (state, resp, resp, scalar(jnp.int32))),
                others + _nbytes(batch),
                0.0,
            ),
            "finish_step": (
                (fns.finish_step, (state, scalar(jnp.float32), inputs)),
                others + _nbytes(batch),
                0.0,
            ),
            "diagnostics": (
                (fns.diagnostics, (resp, batch.advantages, resp)),
                _nbytes(state) + others + _nbytes(batch),
                0.0,
            ),
        }
        if c.diagnostics.entropy_check_every:
            todo["entropy_check"] = (
                (fns.entropy_check, (state.params, state.params, batch)),
                _nbytes(state) + engine_bytes + ref_bytes,
                model_flops(self.cfg, tokens, ctx, 2) / chips,
            )
        rows = []
        for name, (program, resident, flops) in todo.items():
            if only is None or name in only:
                rows.append(
                    self._compile(name, program, resident, flops, self._collectives(name, c))
                )
        if c.algo.kl_coef > 0 and (only is None or "reference_pass" in only):
            # The same program as the policy pass, over the frozen reference parameters.
            ref = next((r for r in rows if r.name == "policy_pass"), None)
            if ref is not None:
                rows.append(dataclasses.replace(ref, name="reference_pass", compile_s=0.0))
        if s.old_from_update and only is None:  # the update computes the old log-probs
            rows = [r for r in rows if r.name != "policy_pass"]
        return rows

    def _engine_params(self):
        shardings = engine_lib.sampler_param_shardings(self.params, self.mesh)
        dt = as_dtype(self.sampler_cfg.dtype)
        cast = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            ),
            self.params,
        )
        return _abstract(cast, shardings)

    def sampler_rows(self, c: ml_collections.ConfigDict, only: set[str] | None = None) -> list[Row]:
        shape = config_lib.engine_shape(c)
        slots, prefill_len = shape["max_concurrent_decodes"], shape["max_prefill_length"]
        target = shape["max_target_length"]
        fns = engine_lib.programs(self.engine_graphdef)
        repl = NamedSharding(self.mesh, PartitionSpec())
        params = self._engine_params()
        abstract_state, state_sh = engine_lib.decode_state_layout(
            self.sampler_cfg, slots, target, 8, None, self.mesh
        )
        state = _abstract(abstract_state, state_sh)

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=repl)

        # The rollout's batched calls at their largest: a prefill of the most prompts one call
        # takes (a row bucket), each with its n requests; an insert filling every slot.
        most = shape["max_prefill_batch"]
        rows = engine_lib.fit_bucket(
            engine_lib.buckets(1, most), min(most, c.train.prompts_per_step)
        )
        n = engine_lib.next_power_of_two(c.rollout.n)

        def field(shape, dtype):  # one request field, [R, n, ...]
            return spec((rows, n, *shape), dtype)

        request = engine_lib.RequestParams(
            key=field((2,), jnp.uint32),
            temperature=field((), jnp.float32),
            top_p=field((), jnp.float32),
            top_k=field((), jnp.int32),
            max_new_tokens=field((), jnp.int32),
            stop_ids=field((8,), jnp.int32),
        )
        tokens, lengths = spec((rows, prefill_len), jnp.int32), spec((rows,), jnp.int32)
        with jax.set_mesh(self.mesh):
            prefix = jax.eval_shape(fns.prefill_batch, params, tokens, lengths, request)
        prefix = jax.tree.map(lambda x: spec(x.shape, x.dtype), prefix)
        per_slot = spec((slots,), jnp.int32)
        train_state = _nbytes(self.state)
        ref = _nbytes(self.state.params) if c.algo.kl_coef > 0 else 0
        sync = jax.jit(
            lambda p: engine_lib.cast_params(p, as_dtype(self.sampler_cfg.dtype)),
            out_shardings=engine_lib.sampler_param_shardings(self.params, self.mesh),
        )
        decode_flops = model_flops(self.cfg, slots * engine_lib.DECODE_STEPS, target, 1)
        todo = {
            "sampler_sync": (  # the trainer's parameters are the argument
                (sync, (self.state.params,)),
                train_state - _nbytes(self.state.params) + ref,
                0.0,
            ),
            "prefill": (
                (fns.prefill_batch, (params, tokens, lengths, request)),
                train_state + ref + _nbytes(state),
                model_flops(self.cfg, rows * prefill_len, prefill_len, 1) / self.mesh.size,
            ),
            "insert": (
                (fns.insert_batch, (prefix, state, per_slot, per_slot, per_slot)),
                train_state + ref + _nbytes(params),
                0.0,
            ),
            "generate": (
                (fns.generate, (params, state, spec((), jnp.int32), engine_lib.DECODE_STEPS)),
                train_state + ref,
                decode_flops / self.mesh.size,
            ),
        }
        return [
            self._compile(name, program, resident, flops, self._collectives(name, c))
            for name, (program, resident, flops) in todo.items()
            if only is None or name in only
        ]

    def _collectives(self, name: str, c: ml_collections.ConfigDict) -> float:
        """Per chip bytes a call's FSDP collectives move: the parameters gathered for each
        forward or backward pass (compute dtype) and the gradients reduce-scattered
        (parameter dtype); the sampler's copy re-laid out once per step."""
        fsdp = self.mesh.shape["fsdp"]
        numel = sum(math.prod(x.shape) for x in jax.tree.leaves(self.params))
        gather = lambda dtype: roofline.gather_bytes(numel * as_dtype(dtype).itemsize, fsdp)  # noqa: E731
        passes = 3 if c.model.remat != "none" else 2  # forward, backward (+ recompute)
        return {
            "policy_pass": gather(self.cfg.dtype),
            "update": passes * gather(self.cfg.dtype) + gather(self.cfg.param_dtype),
            "entropy_check": 2 * gather(self.cfg.dtype),
            "sampler_sync": gather(self.sampler_cfg.dtype),
        }.get(name, 0.0)

    def calls_per_step(self, c: ml_collections.ConfigDict, mean_len: float) -> dict[str, float]:
        """How often a step calls each program, with responses of `mean_len` tokens."""
        prompts, n = c.train.prompts_per_step, c.rollout.n
        most = c.rollout.max_prefill_batch
        rows = engine_lib.fit_bucket(engine_lib.buckets(1, most), min(most, prompts))
        prefills = math.ceil(prompts / rows)
        every = c.diagnostics.entropy_check_every
        return {
            "sampler_sync": 1,
            "prefill": prefills,
            "insert": prefills,
            "generate": roofline.generate_calls(
                prompts * n, c.rollout.max_slots, mean_len, engine_lib.DECODE_STEPS
            ),
            "policy_pass": 1,
            "reference_pass": 1,
            "update": config_lib.updates_per_step(c),
            "step_inputs": 2 if self._settings(c).old_from_update else 1,
            "finish_step": 1,
            "diagnostics": 1,
            "entropy_check": 1 / every if every else 0,
        }

    def run(self, c: ml_collections.ConfigDict | None = None) -> list[Row]:
        c = self.config if c is None else c
        return self.sampler_rows(c) + self.train_rows(c)

    # -- what would fit

    def fits(self, row: Row) -> bool:
        return self.hbm_bytes is None or row.total <= self.hbm_bytes

    def suggest(self, row: Row) -> str:
        """The smallest change that makes `row` fit (recompiling that program), or why not."""
        c, shards = self.config, batch_shards(self.mesh)
        if row.name in ("prefill", "insert", "generate"):  # the KV cache shrinks with slots
            slots = c.rollout.max_slots // 2
            while slots >= shards:  # fewer slots than the cache's split would replicate it
                trial = ml_collections.ConfigDict(c.to_dict())
                trial.rollout.max_slots = slots
                (new,) = self.sampler_rows(trial, only={row.name})
                if self.fits(new):
                    return f"--config.rollout.max_slots={slots} ({new.total / GiB:.1f} GiB)"
                slots //= 2
        if row.arguments + row.resident > self.hbm_bytes:
            need = math.ceil(self.mesh.size * (row.arguments + row.resident) / self.hbm_bytes)
            return (
                f"its arguments and resident buffers alone take "
                f"{(row.arguments + row.resident) / GiB:.1f} GiB per chip: spread the state "
                f"over at least {need} chips (a larger slice, or more fsdp in the mesh)"
            )
        if row.name in ("prefill", "insert", "generate"):
            return "no rollout.max_slots fits: use a larger slice"
        seqs = c.train.mini_batch_prompts * c.rollout.n
        micro = c.train.micro_batch_sequences // 2
        while micro >= shards:
            if micro % shards == 0 and seqs % micro == 0:
                trial = ml_collections.ConfigDict(c.to_dict())
                trial.train.micro_batch_sequences = micro
                name = "policy_pass" if row.name == "reference_pass" else row.name
                (new,) = self.train_rows(trial, only={name})
                if self.fits(new):
                    return (
                        f"--config.train.micro_batch_sequences={micro} ({new.total / GiB:.1f} GiB)"
                    )
            micro //= 2
        for tensor in (2, 4, 8):  # then tensor parallelism: fewer rows and heads per device
            data, fsdp, _ = self.mesh.devices.shape
            if (fsdp * self.mesh.shape["tensor"]) % tensor or tensor <= self.mesh.shape["tensor"]:
                continue
            shape = (data, fsdp * self.mesh.shape["tensor"] // tensor, tensor)
            mesh = Mesh(self.mesh.devices.reshape(shape), MESH_AXES)
            trial = ml_collections.ConfigDict(c.to_dict())
            trial.train.micro_batch_sequences = max(
                c.train.micro_batch_sequences // tensor, batch_shards(mesh)
            )
            if seqs % trial.train.micro_batch_sequences:
                continue
            name = "policy_pass" if row.name == "reference_pass" else row.name
            other = Planner(trial, mesh, self.hbm_bytes, self.log)
            (new,) = other.train_rows(trial, only={name})
            if self.fits(new):
                return (
                    f"--config.mesh.shape='{shape}' --config.train.micro_batch_sequences="
                    f"{trial.train.micro_batch_sequences} ({new.total / GiB:.1f} GiB)"
                )
        return f"no micro_batch_sequences >= {shards} or tensor split fits: use a larger slice"


# --------------------------------------------------------------------------- output


def table(rows: list[Row], hbm_bytes: int | None) -> str:
    cap = f"{hbm_bytes / GiB:.1f}" if hbm_bytes else "?"
    head = (
        "| program | arguments GiB | temp GiB | outputs GiB | resident GiB | total GiB | "
        f"HBM GiB | fits | TFLOPs/chip/call | compile s |\n|{'---|' * 10}"
    )
    lines = [head]
    for r in rows:
        ok = "?" if hbm_bytes is None else ("yes" if r.total <= hbm_bytes else "**no**")
        lines.append(
            f"| {r.name} | {r.arguments / GiB:.2f} | {r.temp / GiB:.2f} | {r.outputs / GiB:.2f} "
            f"| {r.resident / GiB:.2f} | {r.total / GiB:.2f} | {cap} | {ok} | "
            f"{r.flops / 1e12:.2f} | {r.compile_s:.1f} |"
        )
    return "\n".join(lines)


def timing(
    planner: Planner, rows: list[Row], chip: roofline.Chip, mean_len: float
) -> dict[str, Any]:
    """The roofline time of each program's calls in one step and of the whole run, with
    responses of `mean_len` tokens: the learner's FLOPs follow the packed tokens
    (prompt + mean response instead of the padded length); a decode step attends to the
    filled part of the cache (prompt + mean_len / 2 on average) and reads every argument
    once (the weights, the whole KV cache: XLA's cost analysis counts a loop's body
    once, so its byte count is a floor); other bytes and collectives are the compiled
    programs' own."""
    c = planner.config
    calls = planner.calls_per_step(c, mean_len)
    p, r = c.data.max_prompt_len, c.rollout.max_new_tokens
    learner = ("policy_pass", "reference_pass", "update", "entropy_check")
    decode, devices = engine_lib.DECODE_STEPS, planner.mesh.size
    programs, step = [], 0.0
    for row in rows:
        flops, moved = (
            row.flops * ((p + mean_len) / (p + r) if row.name in learner else 1.0),
            row.bytes_accessed,
        )
        if row.name == "generate":
            slots = c.rollout.max_slots
            flops = model_flops(planner.sampler_cfg, slots * decode, p + mean_len / 2, 1) / devices
            moved = max(moved, decode * row.arguments)
        one = roofline.call_time(flops, moved, row.collective_bytes, chip)
        n = calls.get(row.name, 1)
        step += n * one.seconds
        programs.append(
            dict(name=row.name, calls=n, flops=flops, bound=one.bound,
                 call_s=one.seconds, step_s=n * one.seconds)
        )  # fmt: skip
    chips = planner.chips
    return {
        "chip": dataclasses.asdict(chip),
        "mean_response_len": mean_len,
        "programs": programs,
        "steps": c.train.steps,
        "chips": chips,
        **roofline.summarize(step, c.train.steps, chips),
    }


def plan(
    config: ml_collections.ConfigDict,
    topology: str | None = None,
    mesh: str | None = None,
    log: Callable[[str], Any] = print,
    mean_response_len: float | None = None,
) -> dict[str, Any]:
    """Check the inputs, compile every program, and return the plan as a dict (with the
    roofline time of a step for responses of `mean_response_len` tokens, default
    `rollout.max_new_tokens`)."""
    config_lib.validate(config, files=False)
    config_lib.model_architecture(config)  # a clear error before anything compiles
    mean_len = float(
        config.rollout.max_new_tokens if mean_response_len is None else mean_response_len
    )
    if not 0 < mean_len <= config.rollout.max_new_tokens:
        raise PlanError(
            f"--mean_response_len={mean_response_len}: must be in (0, rollout.max_new_tokens="
            f"{config.rollout.max_new_tokens}]"
        )
    if topology:
        s = parse_slice(topology)
        devices = slice_devices(s)
        hbm = int(s.hbm_gib * GiB * s.chips / len(devices))  # per device (core)
        where = f"{s.name} ({s.topology}, {s.chips} chips, {len(devices)} devices)"
        chip = per_device(roofline.CHIPS[s.generation], s.chips / len(devices))
        chips = s.chips
    else:
        devices = jax.devices()
        stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
        hbm = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
        where = f"local {devices[0].platform} devices ({len(devices)})"
        chip, chips = roofline.measure_local(devices[0]), len(devices)
    shape = parse_mesh(mesh, tuple(config.mesh.shape), len(devices))
    mesh_ = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    config_lib.validate_mesh(config, mesh_)
    log(f"planning {config.name}:{config.preset} on {where}, mesh {dict(mesh_.shape)}")
    recompute = grpo.logp_remat(config, batch_shards(mesh_))
    log(
        f"attention {config.model.attention} (block {config.model.attention_block}); "
        f"LM-head recompute in the update (model.logp_remat={config.model.logp_remat}): "
        f"{'on' if recompute else 'off'}"
    )
    planner = Planner(config, mesh_, hbm, log, chips=chips)
    t0 = time.perf_counter()
    rows = planner.run()
    failing = [r for r in rows if not planner.fits(r)]
    suggestions = {r.name: planner.suggest(r) for r in failing}
    return {
        "time": timing(planner, rows, chip, mean_len),
        "config": f"{config.name}:{config.preset}",
        "topology": topology or "local",
        "devices": len(devices),
        "mesh": dict(mesh_.shape),
        "hbm_bytes_per_device": hbm,
        "programs": [dataclasses.asdict(r) | {"total": r.total} for r in rows],
        "fits": not failing,
        "suggestions": suggestions,
        "compile_s_total": time.perf_counter() - t0,
    }


def per_device(chip: roofline.Chip, fraction: float) -> roofline.Chip:
    """A chip's rates for one of the plan's devices (`fraction` of a chip)."""
    return dataclasses.replace(
        chip,
        peak_flops=chip.peak_flops * fraction,
        hbm_bytes_per_s=chip.hbm_bytes_per_s * fraction,
        ici_bytes_per_s=chip.ici_bytes_per_s * fraction,
    )


def time_table(t: dict[str, Any]) -> str:
    chip = t["chip"]
    lines = [
        f"\nEstimated time (roofline per device: {chip['peak_flops'] / 1e12:.1f} TFLOP/s, "
        f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s memory, {chip['ici_bytes_per_s'] / 1e9:.0f} "
        f"GB/s interconnect; {chip['source']}), responses of {t['mean_response_len']:.0f} "
        "tokens on average:\n",
        "| program | calls/step | TFLOPs/chip/call | bound | s/call | s/step |",
        f"|{'---|' * 6}",
    ]
    for p in t["programs"]:
        lines.append(
            f"| {p['name']} | {p['calls']:.4g} | {p['flops'] / 1e12:.2f} | {p['bound']} | "
            f"{p['call_s']:.3g} | {p['step_s']:.3g} |"
        )
    lines.append(
        f"\nstep ~{t['step_s']:.1f} s; {t['steps']} steps: ~{t['run_hours']:.1f} h on "
        f"{t['chips']} chips = {t['chip_hours']:.0f} chip-hours (a roofline: the three terms "
        "overlap perfectly; host work and dynamic sampling's extra batches left out)"
    )
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    rows = [Row(**{k: v for k, v in p.items() if k != "total"}) for p in result["programs"]]
    out = [table(rows, result["hbm_bytes_per_device"])]
    out.append(time_table(result["time"]))
    out.append(f"\ncompiled in {result['compile_s_total']:.0f} s")
    if result["fits"]:
        out.append("every program fits")
    for name, fix in result["suggestions"].items():
        out.append(f"DOES NOT FIT: {name}; smallest change that fits: {fix}")
    return "\n".join(out)


# --------------------------------------------------------------------------- command line


def define_flags() -> None:
    """The command line's flags (defined only when run, so that modules import together)."""
    config_flags.DEFINE_config_file(
        "config", "configs/grpo.py", "Experiment config, e.g. configs/steer.py:qwen2.5-math-7b"
    )
    flags.DEFINE_string(
        "topology", None, "TPU slice: v5p-8, v5litepod-16, v6e-8, v4-32, or v5p:2x2x1; "
        "default: the local devices"
    )  # fmt: skip
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (default: config.mesh.shape)")
    flags.DEFINE_string("json", None, "also write the plan to this JSON file")
    flags.DEFINE_float(
        "mean_response_len", None, "expected response tokens (default rollout.max_new_tokens)"
    )
    flags.DEFINE_list(
        "compare", [], "slices to compare, e.g. v5p-8,v5p-64,v6e-16: one summary row each"
    )


def compare(
    config: ml_collections.ConfigDict, slices: list[str], mean_len: float | None, log=print
) -> list[dict[str, Any]]:
    """Plan `config` on each slice (the config's mesh, its -1 filled per slice): one
    summary per slice."""
    for name in slices:  # every name checked before anything compiles
        parse_slice(name)
    out = []
    for name in slices:
        result = plan(config, name, None, log, mean_len)
        largest = max(result["programs"], key=lambda p: p["total"])
        out.append(
            dict(slice=name, chips=result["time"]["chips"], fits=result["fits"],
                 largest=largest["name"], largest_gib=largest["total"] / GiB,
                 **{k: result["time"][k] for k in ("step_s", "run_hours", "chip_hours")})
        )  # fmt: skip
    return out


def compare_table(rows: list[dict[str, Any]], steps: int) -> str:
    lines = [
        f"| slice | chips | fits | largest program (GiB/chip) | est. step s | {steps} steps h "
        f"| chip-hours |\n|{'---|' * 7}"
    ]
    for r in rows:
        lines.append(
            f"| {r['slice']} | {r['chips']} | {'yes' if r['fits'] else '**no**'} | "
            f"{r['largest']} ({r['largest_gib']:.1f}) | {r['step_s']:.1f} | "
            f"{r['run_hours']:.1f} | {r['chip_hours']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if FLAGS.compare:
            rows = compare(FLAGS.config, FLAGS.compare, FLAGS.mean_response_len)
            print(compare_table(rows, FLAGS.config.train.steps))
            if FLAGS.json:
                with open(FLAGS.json, "w") as f:
                    json.dump(rows, f, indent=2)
            sys.exit(0 if all(r["fits"] for r in rows) else 1)
        result = plan(
            FLAGS.config, FLAGS.topology, FLAGS.mesh, mean_response_len=FLAGS.mean_response_len
        )
    except (PlanError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(result))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
