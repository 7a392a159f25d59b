"""Evaluation metrics against brute-force and hand-computed references; eval set specs."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from jaxrlvr.config import ConfigError
from jaxrlvr.study.evaluation import (
    Sample,
    benchmark_metrics,
    distinct_n,
    expected_calibration_error,
    flat_eval_metrics,
    majority_correct,
    pairwise_dissimilarity,
    parse_eval_specs,
    pass_at_k,
    pass_ks,
)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(correct, k))
            brute = np.mean([any(s) for s in subsets])
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(16) == [1, 2, 4, 8, 16]
    assert pass_ks(12) == [1, 2, 4, 8, 12]


def test_majority_vote():
    assert majority_correct(["5", " 5", "7"], [True, True, False])
    assert not majority_correct(["7", "5", "7"], [False, True, False])
    assert majority_correct(["5", "7"], [True, False])  # a tie: the first seen wins
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, None, "3"], [False, False, True])  # None never votes


def test_expected_calibration_error_by_hand():
    conf = np.array([0.05, 0.15, 0.95, 0.95])
    correct = np.array([0, 1, 1, 0])
    # bins 0, 1 and 9: (1/4)|0.05-0| + (1/4)|0.15-1| + (2/4)|0.95-0.5|
    expected = 0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.45
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert expected_calibration_error(np.array([1.0]), np.array([1])) == 0.0  # top bin


def test_diversity_by_hand():
    a, b = [1, 2, 3], [1, 2, 4]
    assert distinct_n([a, b], 1) == pytest.approx(4 / 6)
    assert distinct_n([a, b], 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    # bigrams {12, 23} vs {12, 24}: Jaccard 1/3
    assert pairwise_dissimilarity([a, b]) == pytest.approx(2 / 3)
    assert pairwise_dissimilarity([a, a, a]) == 0.0
    assert np.isnan(pairwise_dissimilarity([a]))


def _samples(correct_per_prompt, answers=None):
    out = []
    for p, row in enumerate(correct_per_prompt):
        for i, ok in enumerate(row):
            answer = answers[p][i] if answers else ("1" if ok else "0")
            out.append(Sample("b", p, i, (p, i, 7), "", answer, bool(ok), np.log(0.5)))
    return out


def test_benchmark_metrics():
    m = benchmark_metrics(_samples([[1, 0, 0, 0], [1, 1, 1, 0]]), 4)
    assert m["avg@4"] == pytest.approx(0.5)
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["pass@4"] == 1.0
    assert m["maj@4"] == pytest.approx(0.5)  # prompt 0 votes "0", prompt 1 votes "1"
    assert m["length"] == 3.0 and m["prompts"] == 2
    assert m["ece"] == pytest.approx(0.0)  # confidence 0.5, accuracy 0.5, one bin
    with pytest.raises(ValueError, match="exactly n=4"):
        benchmark_metrics(_samples([[1, 0, 0]]), 4)


def test_flat_eval_metrics_pool_and_name_each_set():
    one = {"math": {"avg@4": 0.5}}
    assert flat_eval_metrics(one) == {"eval_avg@4": 0.5}
    two = {"a": {"avg@4": 0.5}, "b": {"avg@4": 0.25}, "all": {"avg@4": 0.4}}
    assert flat_eval_metrics(two) == {
        "eval_avg@4": 0.4, "eval/a/avg@4": 0.5, "eval/b/avg@4": 0.25,
    }  # fmt: skip


def one(spec: str, answer_field: str = "answer", template: str = "dapo"):
    [s] = parse_eval_specs(spec, answer_field, template)
    return s


def test_eval_specs_short_form():
    s = one("aime=/d/aime.jsonl:solution:qwen_chat")
    assert (s.name, s.path, s.answer_field, s.template) == (
        "aime", "/d/aime.jsonl", "solution", "qwen_chat",
    )  # fmt: skip
    s = one("/d/math500.parquet")
    assert (s.name, s.answer_field, s.template) == ("math500", "answer", "dapo")
    assert one("x=/d/x.jsonl::raw").template == "raw"
    with pytest.raises(ConfigError, match="expected NAME=PATH"):
        one("x=/d/x.jsonl:a:b:c")
    with pytest.raises(ConfigError, match="used twice"):
        parse_eval_specs("/a/eval.jsonl,/b/eval.jsonl", "answer", "raw")


def test_eval_specs_take_urls_and_per_set_fields():
    # the short form keeps a URL's scheme (it split `aime=gs://b/x.parquet` into path `gs`)
    s = one("aime=gs://b/x.parquet")
    assert (s.name, s.path, s.answer_field) == ("aime", "gs://b/x.parquet", "answer")
    s = one("gs://b/aime24.parquet:gt")
    assert (s.name, s.path, s.answer_field) == ("aime24", "gs://b/aime24.parquet", "gt")
    # keyed form: every field per set; a repeated key starts the next set
    specs = parse_eval_specs(
        "name=amc,path=gs://b/amc.parquet,prompt_field=question,answer_field=answer,"
        "template=qwen_chat,name=aime,path=memory://d/aime.parquet,math=/d/m.jsonl",
        "reward_model.ground_truth",
        "dapo",
    )
    got = [(s.name, s.path, s.prompt_field, s.answer_field, s.template) for s in specs]
    assert got == [
        ("amc", "gs://b/amc.parquet", "question", "answer", "qwen_chat"),
        ("aime", "memory://d/aime.parquet", "", "reward_model.ground_truth", "dapo"),
        ("math", "/d/m.jsonl", "", "reward_model.ground_truth", "dapo"),
    ]
    # repeatable --eval flags: a list of such strings
    assert [s.name for s in parse_eval_specs(["name=a,path=/a.jsonl", "b=/b.jsonl"])] == ["a", "b"]
    with pytest.raises(ConfigError, match="no path="):
        parse_eval_specs("name=a,prompt_field=question")
    with pytest.raises(ConfigError, match="template='chatml'; choose one of"):
        parse_eval_specs("path=/a.jsonl,template=chatml")
    with pytest.raises(ConfigError, match="prompt_field= is empty"):
        parse_eval_specs("path=/a.jsonl,prompt_field=")


def evaluate_cli(*flags: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "jaxrlvr.evaluate", *flags], cwd=Path(__file__).parents[1],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_checkpoint_lengths_rule():
    from jaxrlvr.evaluate import checkpoint_lengths

    def lengths(context, **given):
        got = checkpoint_lengths(context, {k.replace("__", "."): v for k, v in given.items()})
        return got["data.max_prompt_len"], got["rollout.max_new_tokens"]

    assert lengths(4096) == (1024, 3072)  # Qwen2.5-Math-1.5B/7B
    assert lengths(512) == (128, 384)
    assert lengths(32768, rollout__max_new_tokens=8) == (1024, 8)
    assert lengths(512, rollout__max_new_tokens=500) == (12, 500)
    with pytest.raises(ConfigError, match="do not fit the checkpoint's context of 100"):
        lengths(100, data__max_prompt_len=90, rollout__max_new_tokens=20)


def test_evaluate_bare_checkpoint_takes_its_lengths_and_refuses_an_empty_set(tmp_path):
    """No run config, no --preset: lengths come from the checkpoint (context 512: prompts
    up to 128 tokens), not the demo's 16; a set that keeps no prompt is refused (it wrote
    `{"aime24": {}}` and exited 0); a workdir given as --checkpoint points to --workdir."""
    import json

    from tiny_policy import write_tiny_policy

    policy = write_tiny_policy(tmp_path / "policy")
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"question": "1+" * 300 + "1=", "answer": 1}) + "\n"
                            for _ in range(2)))  # fmt: skip
    out = evaluate_cli(f"--checkpoint={policy}", f"--eval=aime24={long}", f"--out={tmp_path}/e")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --eval=aime24: no prompt of {long} is kept (2 longer than "
        "max_prompt_len=128 tokens); raise --max_prompt_len"
    )
    assert not (tmp_path / "e" / "eval.json").exists()
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"preset": "demo", "model": {}}))
    out = evaluate_cli(f"--checkpoint={workdir}", f"--eval={long}", f"--out={tmp_path}/e")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: --checkpoint={workdir} is a training workdir (a run's")
    assert f"use --workdir={workdir}" in line and f"--checkpoint={workdir / 'hf'}" in line
    out = evaluate_cli(f"--checkpoint={policy}", f"--eval={long}", "--out=gs://b/eval")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --out='gs://b/eval': a gs:// URL, not a path")
    assert not (Path(__file__).parents[1] / "gs:").exists()
