"""The shared conformance suite (attncc.testing) for the numpy backend on every example spec."""

import pytest

from attncc.testing import conformance_cases, run_case

CASES = conformance_cases("numpy", dtypes=("float32", "float64"))


def test_every_example_is_covered():
    assert CASES, "no example specs found"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case):
    run_case(case)
