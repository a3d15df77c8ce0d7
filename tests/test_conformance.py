"""The shared conformance suite (attncc.testing) for the numpy backend on every example spec."""

import numpy as np
import pytest

import attncc
from attncc.reference import attend
from attncc.testing import (
    FACTOR,
    check_kernel,
    conformance_cases,
    example_specs,
    max_error,
    random_inputs,
    run_case,
)
from attncc.testing.accuracy import judge

CASES = conformance_cases("numpy", dtypes=("float32", "float64"))


def test_every_example_is_covered():
    assert CASES, "no example specs found"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case):
    run_case(case)


# The suite itself: it must fail wrong kernels, and check gradients where a kernel has them.


class EagerKernel:
    """attend() as a kernel, with an optional relative output error and gradient error."""

    backend = "eager"

    def __init__(self, spec, out_error=0.0, grad_error=0.0):
        self.spec, self.out_error, self.grad_error = spec, out_error, grad_error
        self.backward = True if grad_error is not None else None

    def __call__(self, q, k, v, return_lse=False, **inputs):
        result = attend(self.spec, q, k, v, inputs, return_lse=return_lse)
        out = result[0] if return_lse else result
        out = out * (1 + self.out_error)
        if self.grad_error:  # value unchanged, gradient of q shifted
            out = out + self.grad_error * (q - q.detach()).sum()
        return (out, result[1]) if return_lse else out


def test_a_kernel_less_exact_than_the_rule_fails():
    spec = attncc.load_spec("examples/alibi.yaml")
    q, k, v, ins = random_inputs(spec, 2, 37, 37, "float32", seed=1)
    assert check_kernel(EagerKernel(spec, grad_error=None), spec, q, k, v, ins).ok
    report = check_kernel(EagerKernel(spec, 1e-4, grad_error=None), spec, q, k, v, ins)
    assert not report.ok
    assert [c.quantity for c in report.checks if not c.ok] == ["out"]
    assert "FAIL" in str(report) and "out" in str(report)


def test_gradients_are_checked_against_float64_autograd():
    torch = pytest.importorskip("torch")
    spec = attncc.load_spec("examples/memory_tokens.yaml")
    q, k, v, ins = random_inputs(spec, 2, 30, 30, "float32", seed=2, library="torch")
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32
    good = check_kernel(EagerKernel(spec), spec, q, k, v, ins)
    assert good.ok, str(good)
    assert {c.quantity for c in good.checks} >= {"grad q", "grad k", "grad v", "grad mem_k",
                                                 "grad mem_v"}
    bad = check_kernel(EagerKernel(spec, grad_error=1e-3), spec, q, k, v, ins)
    assert [c.quantity for c in bad.checks if not c.ok] == ["grad q"]


def test_rule_and_max_error():
    assert FACTOR >= 1
    assert max_error(np.array([-np.inf, 1.0]), np.array([-np.inf, 1.5])) == 0.5
    assert max_error(np.array([0.0]), np.array([-np.inf])) == np.inf
    assert max_error(np.array([np.nan]), np.array([0.0])) == np.inf
    # an eager run that overflowed must not widen the bound to infinity
    broken = judge("grad q", np.array([1.0]), np.array([np.inf]), np.array([0.5]), "float32")
    assert broken.eager_error == np.inf and not broken.ok


def test_random_inputs_are_valid_and_library_independent():
    spec = attncc.load_spec("examples/document_mask.yaml")
    q, k, _, ins = random_inputs(spec, 3, 20, 20, "float16", seed=4)
    assert q.dtype == np.float16 and q.shape == (3, 4, 20, 16) and k.shape == (3, 2, 20, 16)
    doc = ins["doc"]
    assert doc.dtype == np.int32 and np.all(np.diff(doc, axis=-1) >= 0) and doc.max() < 4
    nys = attncc.load_spec("examples/nystrom.yaml")
    q, k, _, _ = random_inputs(nys, 1, 20, 33, "float64")
    assert q.shape[2] % 16 == 0 and k.shape[2] % 16 == 0
    lin = attncc.load_spec("examples/linformer.yaml")
    _, _, _, ins = random_inputs(lin, 1, 20, 400, "float64")
    assert abs(ins["E"].std() * 20 - 1) < 0.1  # scaled by 1/sqrt(seq_k)
    torch = pytest.importorskip("torch")
    tq, _, _, tins = random_inputs(spec, 3, 20, 20, "float64", seed=4, library="torch")
    nq, _, _, nins = random_inputs(spec, 3, 20, 20, "float64", seed=4)
    assert np.array_equal(tq.numpy(), nq) and np.array_equal(tins["doc"].numpy(), nins["doc"])
    assert tins["doc"].dtype == torch.int32


def test_example_specs_picks_up_any_spec_file(tmp_path, monkeypatch):
    for name in ("a.yaml", "b.toml", "c.json", "notes.md"):
        (tmp_path / name).write_text("")
    assert [p.name for p in example_specs(tmp_path)] == ["a.yaml", "b.toml", "c.json"]
    monkeypatch.setenv("ATTNCC_EXAMPLES", str(tmp_path))
    assert len(example_specs()) == 3
    assert example_specs(tmp_path / "missing") == []
