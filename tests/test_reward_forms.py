"""The reward table of docs/training.md: this project's math reward and math_verify on the
answer forms of tests/reward_forms.py, checked live, and the table generated from them."""

from __future__ import annotations

import os

import pytest
from reward_forms import (
    DOC,
    FORMS,
    VERL,
    VERL_VERSION,
    Form,
    doc_table,
    load_verl_scorer,
    math_verify_verdict,
    table_lines,
    verl_verdict,
)

from jaxrlvr.rewards.math import check_math_response
from jaxrlvr.rewards.types import OK

IDS = [f.id for f in FORMS]
VERL_ENV = "JAXRLVR_VERL_MATH_DAPO"  # a verl wheel, or its math_dapo.py: run verl live


def test_forms_are_many_distinct_and_explained() -> None:
    assert len(FORMS) >= 60
    assert len(set(IDS)) == len(IDS)
    assert list(VERL) == IDS  # the recorded verl column covers exactly these forms
    for f in FORMS:
        rewarded = {f.ours == OK, f.math_verify == OK, VERL[f.id] == OK}
        assert f.why or len(rewarded) == 1, f"{f.id}: the scorers' rewards differ; say why"


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_this_projects_verdict(form: Form) -> None:
    assert check_math_response(form.response, form.truth) == form.ours


@pytest.mark.parametrize("form", FORMS, ids=IDS)
def test_math_verify_verdict(form: Form) -> None:
    assert math_verify_verdict(form.response, form.truth) == form.math_verify


def test_doc_table_is_the_forms() -> None:
    text = DOC.read_text()
    assert doc_table(text) == table_lines(FORMS, VERL, VERL_VERSION), (
        "docs/training.md's reward table is stale: run `python tests/reward_forms.py --write`"
    )
    assert f"on {len(FORMS)} answer forms" in text


@pytest.mark.skipif(not os.environ.get(VERL_ENV), reason=f"{VERL_ENV} names no verl module")
def test_verl_column_is_verls_verdict() -> None:
    compute_score, version, _ = load_verl_scorer(os.environ[VERL_ENV])
    assert version in (VERL_VERSION, "unknown")
    assert {f.id: verl_verdict(compute_score, f.response, f.truth) for f in FORMS} == VERL
