"""The sampling engine and rollout driver: exactness, scheduling, weight sync, errors."""

import inspect
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import save_random_hf_checkpoint, tiny

from jaxrlvr.models import load_hf_checkpoint
from jaxrlvr.sampling import Completion, Engine, SamplingParams, generate
from jaxrlvr.sampling import rollout as rollout_mod
from jaxrlvr.sampling.engine import next_power_of_two
from jaxrlvr.sampling.sample import filter_weights, inverse_cdf, sample_tokens
from jaxrlvr.sharding import make_mesh, shard_model

CFG = tiny()
PROMPT_LENGTHS = [3, 9, 17, 5, 12, 1]  # buckets 16 and 32
MAX_NEW = 10
ONE_DEVICE = make_mesh([1, 1, 1], devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our model, the Hugging Face model) with the same random weights."""
    path = tmp_path_factory.mktemp("sampling-model")
    hf = save_random_hf_checkpoint(CFG, path, seed=7)
    return load_hf_checkpoint(path), hf


@pytest.fixture(scope="module")
def model(pair):
    return pair[0]


def make_engine(model, **kw) -> Engine:
    """Engines of one shape share their compiled functions across tests."""
    args = dict(
        max_concurrent_decodes=3,
        max_prefill_length=32,
        max_target_length=64,
        decode_steps=4,
        mesh=ONE_DEVICE,
    )
    return Engine(model, **(args | kw))


@pytest.fixture(scope="module")
def engine(model):
    return make_engine(model)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def forward(model):
    """Jitted full forward on sequences right-padded to 64: `ids -> [len, V]` logits."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])

    def run(ids):
        x = np.zeros((1, 64), np.int32)
        x[0, : len(ids)] = ids
        return np.asarray(fwd(state, x))[: len(ids)]

    return run


def reference_greedy(forward, prompt, max_new):
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(np.argmax(forward(ids)[-1])))
    return ids[len(prompt) :]


def teacher_forced_logprobs(forward, prompt, completion: Completion, temperature):
    """log_softmax(logits / T) of each completion token, from one full forward."""
    ids = list(prompt) + completion.token_ids
    logits = forward(ids)[len(prompt) - 1 : len(ids) - 1] / (temperature or 1.0)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    return logp[np.arange(len(completion.token_ids)), completion.token_ids], logits


# --------------------------------------------------------------------------- exactness


def test_greedy_equals_argmax_of_full_forward(engine, prompts, forward):
    out = generate(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    for prompt, (c,) in zip(prompts, out, strict=True):
        assert c.token_ids == reference_greedy(forward, prompt, MAX_NEW)
        assert c.finish_reason == "length" and len(c.logprobs) == MAX_NEW
        ref, _ = teacher_forced_logprobs(forward, prompt, c, 1.0)  # greedy: scored at T = 1
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-5)


def test_greedy_equals_transformers_generate(pair, engine, prompts):
    _, hf = pair
    out = generate(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    for prompt, (c,) in zip(prompts, out, strict=True):
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        assert c.token_ids == ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced(engine, prompts, forward, temperature):
    top_p, top_k = 0.8, 20
    sp = SamplingParams(
        n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=MAX_NEW, seed=5
    )
    out = generate(engine, prompts, sp)
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            ref, logits = teacher_forced_logprobs(forward, prompt, c, temperature)
            np.testing.assert_allclose(c.logprobs, ref, atol=1e-5)
            # Every sampled token lies in the top-k / top-p set (sort-based reference).
            for z, tok in zip(logits, c.token_ids, strict=True):
                assert tok in nucleus(z, top_p, top_k)


def nucleus(z: np.ndarray, top_p: float, top_k: int) -> set[int]:
    order = np.argsort(-z, kind="stable")[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    return set(order[np.cumsum(p) - p < top_p].tolist())


def test_filter_matches_sort_reference():
    rng = np.random.default_rng(1)
    x = (3 * rng.normal(size=(6, 1000))).astype(np.float32)
    w = np.exp(x - x.max(-1, keepdims=True))
    top_p = np.array([0.9, 0.5, 0.95, 1.0, 0.3, 0.99], np.float32)
    top_k = np.array([0, 50, 10, 7, 1000, 300], np.int32)
    kept = np.asarray(filter_weights(*map(jnp.asarray, (x, w, top_p, top_k)))) > 0
    for b in range(6):
        ref = nucleus(x[b], top_p[b], top_k[b] or 1000)
        assert set(np.flatnonzero(kept[b]).tolist()) == ref


def test_inverse_cdf_distribution():
    w = np.zeros((1, 600), np.float32)
    w[0, [1, 3, 300, 599]] = [1, 2, 1, 4]
    u = np.random.default_rng(0).random(40000).astype(np.float32)
    idx = np.asarray(inverse_cdf(jnp.asarray(np.repeat(w, len(u), 0)), jnp.asarray(u)))
    counts = np.bincount(idx, minlength=600)
    assert counts[[1, 3, 300, 599]].sum() == len(u)  # never a zero-weight token
    freq = counts[[1, 3, 300, 599]] / len(u)
    np.testing.assert_allclose(freq, [1 / 8, 2 / 8, 1 / 8, 4 / 8], atol=0.01)


def test_sample_tokens_greedy_rows_and_logprobs():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))
    t = jnp.asarray([0.0, 1.0, 0.5])
    tok, lp = sample_tokens(logits, keys, t, jnp.ones(3), jnp.zeros(3, jnp.int32))
    assert int(tok[0]) == int(jnp.argmax(logits[0]))
    ref = jax.nn.log_softmax(logits / jnp.asarray([1.0, 1.0, 0.5])[:, None])
    np.testing.assert_allclose(lp, ref[jnp.arange(3), tok], atol=1e-6)


# --------------------------------------------------------------------------- scheduling


def test_continuous_batching_matches_one_slot_per_request(model, engine, prompts):
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    few = generate(engine, prompts, sp)  # 3 slots, 6 requests: slots are refilled
    wide = generate(model, prompts, sp, max_slots=len(prompts), mesh=ONE_DEVICE)
    assert [g[0].token_ids for g in few] == [g[0].token_ids for g in wide]


def test_sampling_is_independent_of_slots_and_schedule(model, engine, prompts):
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=MAX_NEW, seed=11)
    runs = [
        generate(engine, prompts, sp),
        generate(engine, prompts, sp),  # same seed, same output
        generate(engine, prompts, sp, continuous=False),  # static batches
        generate(model, prompts, sp, max_slots=1, mesh=ONE_DEVICE, decode_steps=3),
    ]
    tokens = [[[c.token_ids for c in g] for g in run] for run in runs]
    assert all(t == tokens[0] for t in tokens[1:])
    other = generate(engine, prompts, SamplingParams(n=2, max_new_tokens=MAX_NEW, seed=12))
    assert [[c.token_ids for c in g] for g in other] != tokens[0]


def test_n_samples_are_distinct(engine, prompts):
    out = generate(engine, prompts[:2], SamplingParams(n=4, max_new_tokens=MAX_NEW, seed=3))
    for group in out:
        assert len(group) == 4
        assert len({tuple(c.token_ids) for c in group}) == 4


def test_stop_tokens_and_max_new_tokens(engine, prompts):
    greedy = generate(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    toks = greedy[1][0].token_ids
    i = next(i for i in range(1, MAX_NEW) if toks[i] not in toks[:i])  # first fresh token
    stop = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(toks[i],))
    (c,) = generate(engine, [prompts[1]], stop)[0]
    assert c.token_ids == toks[: i + 1] and c.finish_reason == "stop"
    assert c.logprobs == pytest.approx(greedy[1][0].logprobs[: i + 1], abs=1e-6)
    # A stop token as the very first token, and a budget of one token.
    first = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(toks[0],))
    (c,) = generate(engine, [prompts[1]], first)[0]
    assert c.token_ids == toks[:1] and c.finish_reason == "stop"
    (c,) = generate(engine, [prompts[1]], SamplingParams(temperature=0.0, max_new_tokens=1))[0]
    assert c.token_ids == toks[:1] and c.finish_reason == "length"
    out = generate(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=4))
    assert all(len(g[0].token_ids) == 4 and g[0].finish_reason == "length" for g in out)


def test_per_prompt_params(engine, prompts):
    params = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in (1, 7, 3, 10, 2, 5)]
    out = generate(engine, prompts, params)
    assert [len(g[0].token_ids) for g in out] == [1, 7, 3, 10, 2, 5]


# --------------------------------------------------------------------------- batched prefill


def row_of(prefix, i, j):
    """Row i, request j of a `prefill_batch` prefix as a one-prompt `Prefix`."""
    return prefix._replace(
        cache=jax.tree.map(lambda x: x[:, i : i + 1], prefix.cache),
        logits=prefix.logits[i],
        length=prefix.length[i],
        token=prefix.token[i, j],
        logprob=prefix.logprob[i, j],
        request=jax.tree.map(lambda x: x[i, j], prefix.request),
    )


def test_prefill_batch_matches_single_prefills(engine, prompts):
    """Per bucket (16: five prompts in 8 rows; 32: one row): caches, logits, first tokens and
    log-probs of every request equal those of one-prompt prefills forked per request."""
    for bucket in (16, 32):
        group = [p for p in prompts if engine.bucket(len(p)) == bucket]
        requests = [
            [engine.make_request(k, temperature=t, top_p=0.9) for k, t in ((i, 1.0), (99, 0.0))]
            for i in range(len(group))
        ]
        tokens, lengths = engine.pad_batch(group)
        assert tokens.shape == (next_power_of_two(len(group)), bucket)
        batch = engine.prefill_batch(
            params=engine.params, padded_tokens=tokens, true_lengths=lengths, requests=requests
        )
        for i, (prompt, reqs) in enumerate(zip(group, requests, strict=True)):
            padded, n = engine.pad(prompt)
            one = engine.prefill(
                params=engine.params, padded_tokens=padded, true_length=n, request=reqs[0]
            )
            for got, want in zip(batch.cache, one.cache, strict=True):  # [L, R, P, K, Dh]
                np.testing.assert_allclose(got[:, i], want[:, 0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(batch.logits[i], one.logits, rtol=1e-5, atol=1e-5)
            for j, forked in enumerate(engine.fork(one, reqs)):
                assert int(batch.token[i, j]) == int(forked.token)
                np.testing.assert_allclose(batch.logprob[i, j], forked.logprob, rtol=1e-5)
    with pytest.raises(ValueError, match="row buckets"):
        engine.prefill_batch(
            params=engine.params, padded_tokens=np.zeros((3, 16)), true_lengths=[1] * 3
        )


def test_insert_batch_equals_single_inserts(engine, prompts):
    group = prompts[:2]
    requests = [[engine.make_request(s, temperature=1.0, max_new_tokens=5) for s in range(2)]] * 2
    tokens, lengths = engine.pad_batch(group)
    prefix = engine.prefill_batch(
        params=engine.params, padded_tokens=tokens, true_lengths=lengths, requests=requests
    )
    slots, rows, samples = [2, 0], [1, 1], [1, 0]  # one prompt row into two slots
    batched = engine.insert_batch(prefix, engine.init_decode_state(), slots, rows, samples)
    single = engine.init_decode_state()
    for slot, i, j in zip(slots, rows, samples, strict=True):
        single = engine.insert(row_of(prefix, i, j), single, slot)
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.asarray(batched.active).tolist() == [True, False, True]


def count_calls(monkeypatch, eng, names=("prefill", "prefill_batch", "insert", "insert_batch")):
    """Record the arguments (by parameter name) of the engine's calls, and host fetches."""
    calls = {name: [] for name in (*names, "generate_steps", "device_get")}

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            calls[name].append(inspect.signature(fn).bind(*args, **kwargs).arguments)
            return fn(*args, **kwargs)

        return wrapped

    for name in (*names, "generate_steps"):
        monkeypatch.setattr(eng, name, recording(name, getattr(eng, name)))
    monkeypatch.setattr(jax, "device_get", recording("device_get", jax.device_get))
    return calls


def test_rollout_prefills_in_batches(model, monkeypatch):
    """16 prompts of one bucket, 8 per call: 2 prefill calls (not 16), the same samples as
    one prompt per call, and one host fetch per decode block (plus the request keys)."""
    rng = np.random.default_rng(3)
    many = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in range(1, 17)]
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=MAX_NEW, seed=8)
    one = generate(make_engine(model, max_prefill_batch=1), many, sp)
    eng = make_engine(model, max_prefill_batch=8)
    calls = count_calls(monkeypatch, eng)
    out = generate(eng, many, sp)
    assert [len(calls[name]) for name in ("prefill", "prefill_batch", "insert")] == [0, 2, 0]
    assert len(calls["insert_batch"]) < len(many) * sp.n
    assert len(calls["device_get"]) == len(calls["generate_steps"]) + 1
    for a, b in zip(out, one, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_continuous_batching_refills_several_slots_at_once(model, engine, prompts, monkeypatch):
    """Requests 0 and 1 end at the same step: their slots get requests 3 and 4 in one insert."""
    params = [SamplingParams(temperature=0.0, max_new_tokens=m) for m in (3, 3, 10, 6, 6, 6)]
    calls = count_calls(monkeypatch, engine)
    out = generate(engine, prompts, params)
    inserted = [list(args["slots"]) for args in calls["insert_batch"]]
    assert inserted == [[0, 1], [2], [0, 1], [0]]  # buckets 16 and 32 first, then refills
    wide = generate(model, prompts, params, max_slots=len(prompts), mesh=ONE_DEVICE)
    assert [g[0].token_ids for g in out] == [g[0].token_ids for g in wide]


# --------------------------------------------------------------------------- weight sync


def test_weight_sync_changes_outputs_without_recompiling(model, prompts):
    eng = make_engine(model)
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    before = generate(eng, prompts, sp)
    fns = eng._fns
    sizes = [f._cache_size() for f in (fns.prefill, fns.insert, fns.generate)]
    new = jax.tree.map(lambda x: x * 1.3, nnx.state(model))
    eng.update_params(new)
    after = generate(eng, prompts, sp)
    assert [f._cache_size() for f in (fns.prefill, fns.insert, fns.generate)] == sizes
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    with pytest.raises(ValueError, match="update_params"):
        eng.update_params(jax.tree.map(lambda x: x[..., :1], new))


def test_resharding_from_a_trainer_mesh(model, engine, prompts):
    """A sampler on a 2x2x2 mesh takes parameters from a trainer on an 8-way fsdp mesh."""
    trainer = shard_model(
        load_like(model), make_mesh([1, 8, 1])
    )  # same weights, different placement
    eng = Engine(
        trainer,
        max_concurrent_decodes=4,
        max_prefill_length=32,
        max_target_length=64,
        decode_steps=4,
        mesh=make_mesh([2, 2, 2]),
    )
    assert eng.params["embed"][...].sharding.spec != nnx.state(trainer)["embed"][...].sharding.spec
    assert eng.init_decode_state().cache.k.sharding.spec[1] == ("data", "fsdp")  # [L, B, ...]
    sp = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    got = generate(eng, prompts, sp)
    ref = generate(engine, prompts, sp)
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in ref]
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-5)


def load_like(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
        (dict(prompts=[list(range(40))]), "max_prefill_length=32"),
        (dict(prompts=[[1, 999]]), "outside the vocabulary"),
        (dict(params=dict(n=0)), "n=0"),
        (dict(params=dict(temperature=-0.5)), "temperature=-0.5"),
        (dict(params=dict(top_p=0.0)), "top_p=0.0"),
        (dict(params=dict(top_p=1.5)), "top_p=1.5"),
        (dict(params=dict(top_k=-1)), "top_k=-1"),
        (dict(params=dict(max_new_tokens=0)), "max_new_tokens=0"),
        (dict(max_slots=0), "max_slots=0"),
        (dict(params=dict(max_new_tokens=500)), "max_target_length"),
    ],
)
def test_bad_input_fails_before_compiling(model, monkeypatch, kwargs, match):
    def no_compile(*a, **k):
        raise AssertionError("reached compilation")

    monkeypatch.setattr(rollout_mod._Rollout, "__init__", no_compile)
    args = dict(prompts=[[1, 2, 3]], params={}, max_slots=2)
    args |= kwargs
    with pytest.raises(ValueError, match=match):
        sp = SamplingParams(**args.pop("params"))
        generate(
            model,
            args.pop("prompts"),
            sp,
            **args,
            max_prefill_length=32,
            max_target_length=64,
            mesh=ONE_DEVICE,
        )


def test_engine_rejects_bad_sizes(model):
    with pytest.raises(ValueError, match="max_target_length=16"):
        Engine(model, max_concurrent_decodes=2, max_prefill_length=32, max_target_length=16)
    with pytest.raises(ValueError, match="max_concurrent_decodes=0"):
        Engine(model, max_concurrent_decodes=0, max_prefill_length=32)


# --------------------------------------------------------------------------- JetStream


def test_default_import_does_not_import_jetstream():
    code = "import sys, jaxrlvr.sampling; assert 'jetstream' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu"})


def test_jetstream_adapter_gives_the_same_tokens(engine, prompts):
    engine_api = pytest.importorskip(
        "jetstream.engine.engine_api",
        reason="JetStream not installed (pip install 'jaxrlvr[jetstream]')",
    )
    from jaxrlvr.sampling.jetstream import JetStreamAdapter

    adapter = JetStreamAdapter(engine)
    assert isinstance(adapter, engine_api.Engine)
    assert adapter.max_concurrent_decodes == 3 and adapter.max_prefill_length == 32
    sp = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=MAX_NEW, seed=4)
    native = generate(engine, prompts, sp)
    via = generate(engine, prompts, sp, backend="jetstream")
    for a, b in zip(native, via, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
    # The raw contract: prefill -> insert -> generate returns ResultTokens per slot.
    greedy = generate(engine, prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=2))
    state = adapter.init_decode_state()
    padded, n = engine.pad(prompts[0])
    prefix = adapter.prefill_prefix(params=engine.params, padded_tokens=padded, true_length=n)
    state = adapter.insert(prefix, state, 1)
    state, result = adapter.generate(engine.params, state)
    slot = result.convert_to_numpy().get_result_at_slot(1)
    assert [int(prefix.token), int(slot.tokens[0, 0])] == greedy[0][0].token_ids
    assert bool(slot.valid[0, 0]) and int(slot.lengths[0]) == 2
