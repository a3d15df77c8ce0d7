"""Conformance suites any backend can run unchanged (DESIGN §8).

- ``example_specs()``: every spec file in examples/.
- ``random_inputs(spec, batch, seq_q, seq_k, dtype, seed, library, device)``: valid inputs
  (``score_std=`` for extreme scores); ``unfit_reason(spec, sizes)``: why a spec cannot take sizes.
- ``check_kernel(kernel, spec, q, k, v, inputs) -> Report``: the accuracy rule (``FACTOR``,
  ``FLOORS``) against the float64 reference, gradients included for kernels with a backward.
- ``conformance_cases(backend)`` and ``run_case(case)``: the pytest entry.
"""

from attncc.testing.accuracy import FACTOR, FLOORS, Check, Report, check_kernel, max_error
from attncc.testing.cases import (
    DTYPES,
    EXTREME_SIZES,
    EXTREME_STD,
    SIZES,
    Case,
    CaseSkipped,
    conformance_cases,
    exponentiates,
    run_case,
)
from attncc.testing.examples import example_specs, examples_dir
from attncc.testing.inputs import random_inputs, sizes_for, unfit_reason

__all__ = ["DTYPES", "EXTREME_SIZES", "EXTREME_STD", "FACTOR", "FLOORS", "SIZES", "Case",
           "CaseSkipped", "Check", "Report", "check_kernel", "conformance_cases", "example_specs",
           "examples_dir", "exponentiates", "max_error", "random_inputs", "run_case", "sizes_for",
           "unfit_reason"]
