"""The demo base policy: build, cache, atomicity, and loadability (with tiny settings)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlvr import demo_policy as dp
from jaxrlvr.config import DEMO_PRESETS
from jaxrlvr.data.arithmetic import check_answer, generate_problems, write_solution
from jaxrlvr.models.checkpoint import load_hf_checkpoint

TINY = dp.DemoPolicySettings(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=64,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    num_train=32,
    num_eval=8,
    max_ops=2,
    max_operand=9,
)


class Logs(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Logs]:
    cache = tmp_path_factory.mktemp("cache")
    logs = Logs()
    return dp.build_demo_policy(TINY, cache_dir=cache, log=logs), cache, logs


def test_build_writes_a_complete_directory(built):
    path, cache, logs = built
    assert path.parent == cache and path.name == f"demo-policy-{TINY.cache_key()}"
    assert list(cache.iterdir()) == [path]  # no temporary leftovers
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train.jsonl"):
        assert (path / name).is_file(), name
    assert len((path / "train.jsonl").read_text().splitlines()) == TINY.num_train
    assert len((path / "eval.jsonl").read_text().splitlines()) == TINY.num_eval
    info = json.loads((path / dp.INFO_FILE).read_text())
    assert info["settings"] == dataclasses.asdict(TINY)
    assert info["format_version"] == dp.FORMAT_VERSION
    assert 0.0 <= info["base_accuracy"] <= 1.0 and 0.0 <= info["eos_rate"] <= 1.0
    assert info["eval_samples"] == TINY.num_eval * TINY.eval_samples
    assert any("building" in m for m in logs) and any("step 3/3" in m for m in logs)
    assert any("base accuracy" in m for m in logs)


def test_tokenizer_and_model_load(built):
    from transformers import AutoTokenizer

    path = built[0]
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == TINY.model_config().vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (dp.BOS_ID, dp.EOS_ID)
    assert tok("12+7=")["input_ids"] == [dp.BOS_ID, *dp.encode("12+7=")]
    assert tok.decode(dp.encode("3-5=-2;#-2")) == "3-5=-2;#-2"

    model = load_hf_checkpoint(path)
    assert model.config.num_hidden_layers == TINY.num_layers
    assert model.config.eos_token_id == dp.EOS_ID
    ids = jnp.asarray([tok("12+7-5=")["input_ids"]])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_second_call_reuses_the_cache(built, monkeypatch):
    path, cache, _ = built
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("rebuilt instead of reusing the cache")

    monkeypatch.setattr(dp, "_train", no_training)
    logs = Logs()
    assert dp.build_demo_policy(TINY, cache_dir=cache, log=logs) == path
    assert any("reusing cached" in m for m in logs)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_different_settings_give_a_different_directory(built, tmp_path):
    path, cache, _ = built
    keys = {TINY.cache_key()}
    for change in ({"seed": 1}, {"steps": 4}, {"error_rate": 0.2}, {"max_operand": 8}):
        keys.add(dataclasses.replace(TINY, **change).cache_key())
    assert len(keys) == 5
    other = dp.build_demo_policy(dataclasses.replace(TINY, seed=1), cache_dir=cache, log=Logs())
    assert other != path and other.parent == cache
    assert (other / "model.safetensors").read_bytes() != (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_build_leaves_nothing(tmp_path, monkeypatch, error):
    def crash(*a, **k):
        raise error("boom")

    monkeypatch.setattr(dp, "_train", crash)  # after the data files are written
    with pytest.raises(error):
        dp.build_demo_policy(TINY, cache_dir=tmp_path, log=Logs())
    assert list(tmp_path.iterdir()) == []


def test_incomplete_directory_is_rebuilt_and_force_rebuilds(tmp_path, monkeypatch):
    final = tmp_path / f"demo-policy-{TINY.cache_key()}"
    final.mkdir()  # e.g. files deleted by hand: not a usable cache entry
    (final / dp.INFO_FILE).write_text(json.dumps({"base_accuracy": 0.5}))
    (final / "stale").write_text("x")
    logs = Logs()
    assert dp.build_demo_policy(TINY, cache_dir=tmp_path, log=logs) == final
    assert any("building" in m for m in logs) and not (final / "stale").exists()
    assert list(tmp_path.iterdir()) == [final]

    # force: rebuilt and replaced atomically (training stubbed out to keep this fast)
    monkeypatch.setattr(dp, "_train", lambda *a, **k: 0.0)
    logs.clear()
    (final / "stale").write_text("x")
    assert dp.build_demo_policy(TINY, cache_dir=tmp_path, log=logs, force=True) == final
    assert any("building" in m for m in logs) and not (final / "stale").exists()
    assert dp._is_complete(final) and list(tmp_path.iterdir()) == [final]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRLVR_CACHE", str(tmp_path / "c"))
    assert dp.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXRLVR_CACHE")
    assert dp.default_cache_dir() == Path.home() / ".cache" / "jaxrlvr"


def test_training_batch_masks_the_solution_and_eos():
    problems = generate_problems(8, seed=0, max_ops=2, max_operand=9)
    s = dataclasses.replace(TINY, error_rate=0.0)
    ids, mask = dp._batch(problems, np.random.default_rng(0), s, dp.max_sequence_length(s))
    assert ids.shape == (s.batch_size, dp.max_sequence_length(s))
    for row, m in zip(ids, mask, strict=True):
        text = dp.decode(row)
        prompt, solution = text[: text.index("=") + 1], text[text.index("=") + 1 :]
        p = next(q for q in problems if q.prompt == prompt)
        assert solution == write_solution(p)
        targets = row[1:][m.astype(bool)]
        assert dp.decode(targets) == solution and targets[-1] == dp.EOS_ID
        assert row[0] == dp.BOS_ID


def test_sequence_bounds_cover_noisy_solutions():
    s = dp.DemoPolicySettings(max_ops=4, max_operand=99, error_rate=1.0)
    rng = np.random.default_rng(0)
    problems = generate_problems(2000, seed=0, min_ops=4, max_ops=4, max_operand=99)
    assert max(len(p.prompt) for p in problems) <= dp.max_prompt_length(s)
    assert max(len(write_solution(p, rng, 1.0)) for p in problems) <= dp.max_solution_length(s)


def test_careful_style_solutions():
    """The careful style: a `careful_frac` share of solutions, marked by `(`, with their
    own error rate and free `;`/space separators; the rest are the common style."""
    problems = generate_problems(4000, seed=1, min_ops=1, max_ops=3, max_operand=9)
    rng = np.random.default_rng(0)
    out = [write_solution(p, rng, 1.0, careful_frac=0.3, careful_error_rate=0.0) for p in problems]
    careful = np.array([o.startswith("(") for o in out])
    assert abs(careful.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(problems))
    for p, o, c in zip(problems, out, careful, strict=True):
        if c:  # exact, with the plain solution's steps
            plain = o[1:].replace(" ", ";")
            assert plain == write_solution(p) and check_answer(o, p.answer)
        else:  # every common-style step is off (error_rate 1): the first one is wrong
            assert " " not in o and "(" not in o
            lhs, rhs = o.split(";")[0].split("=")
            assert int(rhs) != eval(lhs)
    n_space = sum(ch == " " for o in out if o.startswith("(") for ch in o)
    n_steps = sum(len(p.ops) for p, c in zip(problems, careful, strict=True) if c)
    assert abs(n_space / n_steps - 0.5) < 4 * np.sqrt(0.25 / n_steps)
    s = dp.DemoPolicySettings(max_ops=4, max_operand=99, careful_frac=1.0, careful_error_rate=1.0)
    hard = generate_problems(500, seed=0, min_ops=4, max_ops=4, max_operand=99)
    longest = max(len(write_solution(p, rng, 0.0, careful_frac=1.0, careful_error_rate=1.0))
                  for p in hard)  # fmt: skip
    assert longest <= dp.max_solution_length(s)


def test_careful_style_settings_and_presets():
    """One-style settings keep their cache key whatever `careful_error_rate` says; each demo
    preset has a base policy, `demo-fork`'s with the careful style."""
    plain = dp.DemoPolicySettings()
    assert dataclasses.replace(plain, careful_error_rate=0.5).cache_key() == plain.cache_key()
    mixed = dataclasses.replace(plain, careful_frac=0.1)
    assert mixed.cache_key() != plain.cache_key()
    assert dataclasses.replace(mixed, careful_error_rate=0.5).cache_key() != mixed.cache_key()
    assert set(dp.PRESET_SETTINGS) == set(DEMO_PRESETS)
    assert dp.preset_settings("demo") == dp.preset_settings("demo-hard") == plain
    assert dp.preset_settings("demo-fork").careful_frac > 0
    with pytest.raises(ValueError, match="careful_frac"):
        dp.DemoPolicySettings(careful_frac=1.5)
    with pytest.raises(ValueError, match="no demo policy for preset 'qwen2.5-math-7b'"):
        dp.preset_settings("qwen2.5-math-7b")


def test_measure_accuracy_per_style(built, tmp_path, monkeypatch):
    """A two-style policy's measurement splits by the first character: the careful share
    and each style's accuracy (a one-style policy's has no such keys); a two-style build
    records them for its train prompts."""
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "5-1=", "answer": "4"}]
    # answers 3, 4, 3, 4: careful right, common wrong, careful wrong, common right
    texts = ["(1+2=3 #3", "5-1=5;#5", "(1+2=2;#2", "5-1=4;#4"]
    fake = lambda model, prompts, **kw: [(t, True) for t in texts]  # noqa: E731
    monkeypatch.setattr(dp, "sample_responses", fake)
    two = dataclasses.replace(TINY, careful_frac=0.5, eval_samples=2)
    m = dp.measure_accuracy(None, rows, two)
    assert m["accuracy"] == 0.5 and m["careful_share"] == 0.5
    assert m["careful_accuracy"] == 0.5 and m["common_accuracy"] == 0.5
    texts[:] = ["(1+2=3;#3", "(5-1=4;#4", "(1+2=4;#4", "(5-1=4;#4"]
    m = dp.measure_accuracy(None, rows, two)
    assert m["careful_share"] == 1.0 and m["careful_accuracy"] == 0.75
    assert np.isnan(m["common_accuracy"])
    assert "careful_share" not in dp.measure_accuracy(None, rows, TINY)
    monkeypatch.undo()
    info = json.loads(
        (dp.build_demo_policy(two, cache_dir=tmp_path, log=Logs()) / dp.INFO_FILE).read_text()
    )
    assert 0.0 <= info["train_careful_share"] <= 1.0 and "train_common_accuracy" in info
    assert "train_careful_share" not in json.loads((built[0] / dp.INFO_FILE).read_text())


def test_sampler_stops_at_eos(built):
    model = load_hf_checkpoint(built[0])
    out = dp.sample_responses(model, ["1+2=", "9-3+4="], max_new_tokens=12, seed=0)
    assert len(out) == 2
    for text, done in out:
        assert isinstance(text, str) and isinstance(done, bool)
        assert len(text) <= 12
    greedy = [
        dp.sample_responses(model, ["1+2="], max_new_tokens=12, temperature=0.0, seed=k)
        for k in (0, 1)
    ]
    assert greedy[0] == greedy[1]


def test_invalid_settings():
    with pytest.raises(ValueError, match="error_rate"):
        dp.DemoPolicySettings(error_rate=1.5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dp.DemoPolicySettings(max_position_embeddings=16)
    with pytest.raises(ValueError, match="steps"):
        dp.DemoPolicySettings(steps=0)


def test_cli_prints_path_and_accuracy(built, capsys, monkeypatch):
    path, cache, _ = built
    seen = {}

    def fake_build(settings=None, cache_dir=None, log=print, *, force=False):
        seen.update(cache_dir=cache_dir, force=force, settings=settings)
        return path

    monkeypatch.setattr(dp, "build_demo_policy", fake_build)
    dp.main(["--cache-dir", str(cache), "--force"])
    out = capsys.readouterr().out
    assert str(path) in out and "base accuracy at T=1" in out
    assert seen == {"cache_dir": str(cache), "force": True, "settings": dp.PRESET_SETTINGS["demo"]}
    dp.main(["--preset", "demo-fork", "--cache-dir", str(cache)])
    assert seen["settings"] == dp.PRESET_SETTINGS["demo-fork"] and not seen["force"]
