"""Reward checkers: math-verify answers (extraction, equivalence, time-outs) and the demo task."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrlvr.rewards import REWARD_NAMES, get_reward_fn
from jaxrlvr.rewards.demo import DemoReward, check_demo_response
from jaxrlvr.rewards.math import MathReward, check_math_response, extract_answer
from jaxrlvr.rewards.pool import CheckerPool
from jaxrlvr.rewards.types import ScoreResult, result_from_status

# A real pathological answer: sympy tries to evaluate the tower as a bignum, inside C code
# that neither math-verify's signal.alarm nor anything in-process can interrupt.
HANG = r"The answer is \boxed{9^{9^{9^{9}}}}"


# Checkers run inside pool workers, which get this process's sys.path: make sure this
# module is importable there as THIS, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
THIS = Path(__file__).stem


def raising_check(response: str, answer: str) -> str:
    raise RuntimeError("checker bug")


def dying_check(response: str, answer: str) -> str:
    os._exit(3)


def sleepy_check(response: str, answer: str) -> str:
    if response == "sleep":
        time.sleep(60)
    return "ok" if response == answer else "wrong"


def bogus_check(response: str, answer: str) -> str:
    return "maybe"


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"So the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{5} at first, but \boxed{7} in the end", "7"),
        (r"nested \boxed{\frac{\sqrt{2}}{2}} ok", r"\frac{\sqrt{2}}{2}"),
        (r"\fbox{3}", "3"),
        (r"\boxed 8", "8"),
        ("Work...\nAnswer: 42", "42"),
        ("Work...\nanswer:   $\\frac{3}{4}$  ", r"\frac{3}{4}"),
        ("**Answer:** 17.", "17"),
        ("Answer: 5<|im_end|>", "5"),
        ("Final Answer: The final answer is $12$. I hope it is correct.", "12"),
        (r"Answer: \boxed{9}", "9"),
        ("\\boxed{5}\nAnswer: 6", "6"),  # the last marker wins
        ("Answer: 6\nCheck: \\boxed{5}", "5"),
        (r"cut off \boxed{\frac{1}{2", None),
        ("no final answer here", None),
        (r"\boxed{}", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac12}", "1/2"),
        ("Answer: 1/2", r"\frac{1}{2}"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{\sqrt{50}}", r"5\sqrt{2}"),
        (r"\boxed{x = 3}", "3"),
        ("Answer: $-7$", "-7"),
        (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),
        (r"\boxed{42}", 42),  # integer ground truths from JSON
    ],
)
def test_equivalent_forms_score_ok(response: str, answer: str) -> None:
    assert check_math_response(response, answer) == "ok"


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{3}", "4"),
        (r"\boxed{0.51}", "1/2"),
        (r"\boxed{\sqrt{2}}", "2"),
        ("Answer: 12", "21"),
        (r"\boxed{asdf!!}", "5"),  # garbage parses to nonsense, not to 5
    ],
)
def test_wrong_answers_score_wrong(response: str, answer: str) -> None:
    assert check_math_response(response, answer) == "wrong"


def test_no_answer() -> None:
    assert check_math_response("I think it is 5", "5") == "no_answer"
    assert check_math_response("", "5") == "no_answer"


@pytest.fixture(scope="module")
def math_reward():
    with MathReward(num_workers=2, timeout_s=20.0) as r:
        yield r


def test_math_score_batch(math_reward: MathReward) -> None:
    responses = [r"\boxed{0.5}", "Answer: 3", r"\boxed{3}", "no answer", "\x00\x01 }{ \\boxed{"]
    answers = ["1/2", "3", "4", "1", "2"]
    res = math_reward.score_batch(responses, answers)
    assert isinstance(res, ScoreResult)
    rewards, status = res  # unpacks as a pair
    assert rewards.dtype == np.float32 and rewards.shape == (5,)
    np.testing.assert_array_equal(rewards, [1, 1, 0, 0, 0])
    assert status == ("ok", "ok", "wrong", "no_answer", "no_answer")
    assert res.num_errors == 0
    assert math_reward.score_batch([], []).rewards.shape == (0,)
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        math_reward.score_batch(["a", "b"], ["a"])


def test_unparseable_ground_truth_is_an_error(math_reward: MathReward) -> None:
    res = math_reward.score_batch([r"\boxed{1}"], [""])
    assert res.status == ("error",) and res.num_errors == 1 and res.rewards[0] == 0


def test_hung_check_is_killed_within_limit_and_counted() -> None:
    limit = 1.0
    with MathReward(num_workers=1, timeout_s=limit) as reward:
        reward.score_batch([r"\boxed{1}"], ["1"])  # start and warm the worker
        t0 = time.monotonic()
        res = reward.score_batch([HANG], ["5"])
        elapsed = time.monotonic() - t0
        assert res.status == ("timeout",)
        assert res.rewards[0] == 0.0 and res.num_errors == 1
        assert res.counts()["timeout"] == 1
        assert limit <= elapsed < limit + 3.0, elapsed
        # the killed worker was replaced; later checks still work
        assert reward.pool.restarts == 1
        res = reward.score_batch([r"\boxed{2}", HANG, r"\boxed{3}"], ["2", "5", "3"])
        assert res.status == ("ok", "timeout", "ok")


def test_pool_error_statuses() -> None:
    with CheckerPool(f"{THIS}:raising_check", num_workers=1, timeout_s=10) as pool:
        [(status, detail)] = pool.map([("x", "y")])
        assert status == "error" and "checker bug" in detail
    with CheckerPool(f"{THIS}:dying_check", num_workers=1, timeout_s=10) as pool:
        assert pool.map([("x", "y"), ("x", "y")]) == [("error", "checker worker died")] * 2
        assert pool.restarts == 2
    with CheckerPool(f"{THIS}:bogus_check", num_workers=1, timeout_s=10) as pool:
        assert pool.map([("x", "y")])[0][0] == "error"
    with pytest.raises(RuntimeError, match="failed to load"):
        CheckerPool(f"{THIS}:no_such_function", timeout_s=10).map([("x", "y")])


def test_pool_timeouts_do_not_block_other_workers() -> None:
    with CheckerPool(f"{THIS}:sleepy_check", num_workers=2, timeout_s=1.5) as pool:
        pool.map([("a", "a")] * 2)  # warm both workers
        t0 = time.monotonic()
        out = pool.map([("sleep", "x"), ("a", "a"), ("b", "a"), ("c", "c")])
        assert [s for s, _ in out] == ["timeout", "ok", "wrong", "ok"]
        assert time.monotonic() - t0 < 1.5 + 3.0


def test_result_from_status() -> None:
    res = result_from_status(["ok", "timeout", "error", "wrong"])
    np.testing.assert_array_equal(res.rewards, [1, 0, 0, 0])
    assert res.num_errors == 2
    with pytest.raises(ValueError, match="unknown check status"):
        result_from_status(["fine"])


@pytest.mark.parametrize(
    "response, answer, status",
    [
        ("12+7=19;19-5=14;#14", "14", "ok"),
        ("#14", 14, "ok"),
        ("3-50=-47;#-47", "-47", "ok"),
        ("12+7=19;19-5=14;#14\n", "14", "ok"),
        ("12+7=19;19-5=14;#15", "14", "wrong"),
        ("12+7=19;19-5=14;#-14", "14", "wrong"),
        ("12+7=19;19-5=14;#14;", "14", "no_answer"),  # must end with the answer
        ("12+7=19;19-5=14;14", "14", "no_answer"),
        ("#", "14", "no_answer"),
        ("#1 4", "14", "no_answer"),
        ("#+14", "14", "no_answer"),
        ("#" + "9" * 40, "14", "no_answer"),
        ("", "14", "no_answer"),
        ("#14", "fourteen", "error"),
    ],
)
def test_demo_checker(response: str, answer: str, status: str) -> None:
    assert check_demo_response(response, answer) == status


def test_registry() -> None:
    assert set(REWARD_NAMES) == {"math", "demo"}
    demo = get_reward_fn("demo")
    assert isinstance(demo, DemoReward)
    res = demo.score_batch(["1+1=2;#2", "#3", "junk"], ["2", "2", "2"])
    np.testing.assert_array_equal(res.rewards, [1, 0, 0])
    assert res.status == ("ok", "wrong", "no_answer")
    math = get_reward_fn("math", num_workers=1, timeout_s=3.0)
    assert isinstance(math, MathReward) and math.pool.timeout_s == 3.0
    math.close()
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_fn("code")


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{1\,000}", "1000"),  # thin space: math-verify alone reads the product 1*0
        (r"\boxed{1\thinspace 000}", "1000"),
        (r"\boxed{1\:000}", "1000"),
        (r"\boxed{1\;000}", "1000"),
        (r"\boxed{1\ 000}", "1000"),
        (r"\boxed{1~000}", "1000"),
        (r"\boxed{1 000}", "1000"),
        (r"\boxed{1{,}000}", "1000"),
        (r"\boxed{1\!000}", "1000"),
        (r"\boxed{10\,000\,000}", "10000000"),
        (r"\boxed{1\,000.5}", "1000.5"),
        (r"\boxed{-2\,500}", "-2500"),
        (r"\boxed{1\,000\text{ cm}}", "1000"),
        ("Answer: $12\\,345$", "12345"),
        (r"\boxed{1000}", r"1\,000"),  # separators in the ground truth too
        (r"\boxed{1000}", r"1,\!000"),
    ],
)
def test_digit_group_separators_score_ok(response: str, answer: str) -> None:
    assert check_math_response(response, answer) == "ok"


@pytest.mark.parametrize(
    "response, answer",
    [
        (r"\boxed{2\,3}", "23"),  # not a group of three: left to math-verify (2*3)
        (r"\boxed{0.123\,456}", "0.123456"),  # a decimal's fraction is not regrouped
        (r"\boxed{1\,0000}", "10000"),
        (r"\boxed{1\,000}", "1"),
    ],
)
def test_digit_groups_only_of_three_are_joined(response: str, answer: str) -> None:
    assert check_math_response(response, answer) == "wrong"


def test_overlong_penalty_is_dapos_soft_punishment():
    """verl's DAPO reward manager, item by item: expected = max_len - buffer,
    penalty = min(-(L - expected) / buffer * factor, 0)."""
    from jaxrlvr.rewards.overlong import overlong_penalty

    max_len, buffer, factor = 20, 8, 0.5
    lengths = np.array([1, 11, 12, 13, 16, 19, 20])
    want = [min(-(n - (max_len - buffer)) / buffer * factor, 0.0) for n in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, buffer, factor), want)
    assert want[:3] == [0.0, 0.0, 0.0] and want[-1] == -factor
    assert not overlong_penalty(lengths, max_len, 0, factor).any()  # off
