"""The shared conformance suite (attncc.testing) for the numpy backend on every example spec."""

from pathlib import Path

import numpy as np
import pytest

import attncc
from attncc.reference import attend
from attncc.testing import (
    EXTREME_STD,
    FACTOR,
    check_kernel,
    conformance_cases,
    example_specs,
    exponentiates,
    max_error,
    random_inputs,
    run_case,
    unfit_reason,
)
from attncc.testing.accuracy import judge

CASES = conformance_cases("numpy", dtypes=("float32", "float64"))


def test_every_example_is_covered():
    assert CASES, "no example specs found"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case):
    run_case(case, refusals="fail")


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


def test_overflow_rounds_to_infinity_and_an_overflowed_eager_is_no_yardstick():
    # past float16's range the correctly rounded answer is inf; near the top an inf is a rounding
    assert max_error(np.array([np.inf, 6e4]), np.array([8e6, 6e4]), "float16") == 0.0
    assert max_error(np.array([np.inf]), np.array([65000.0]), "float16") == 520.0
    assert max_error(np.array([np.inf]), np.array([65000.0])) == np.inf
    assert max_error(np.array([-np.inf]), np.array([-np.inf]), "float16") == 0.0
    near = judge("grad q", np.array([1.0]), np.array([np.inf]), np.array([65000.0]), "float16")
    assert near.eager_error == 520.0


def test_float64_eager_error_is_estimated_from_float32():
    """float64's yardstick is the float32 eager error times 2^-29: a float64 kernel that is in
    fact float32-accurate fails, one at float64 rounding passes."""
    torch = pytest.importorskip("torch")
    spec = attncc.load_spec("examples/alibi.yaml")
    q, k, v, ins = random_inputs(spec, 2, 37, 37, "float64", seed=3, library="torch")

    class Float32Inside(EagerKernel):
        def __call__(self, q, k, v, return_lse=False, **inputs):
            cast = {n: (x.float() if x.is_floating_point() else x) for n, x in inputs.items()}
            result = attend(self.spec, q.float(), k.float(), v.float(), cast,
                            return_lse=return_lse)
            return tuple(r.double() for r in result) if return_lse else result.double()

    good = check_kernel(EagerKernel(spec), spec, q, k, v, ins)
    assert good.ok and all(0 < c.eager_error < 1e-13 for c in good.checks), str(good)
    assert not check_kernel(Float32Inside(spec, grad_error=None), spec, q, k, v, ins).ok
    assert isinstance(q, torch.Tensor)


def test_cases_are_only_generated_for_sizes_a_spec_takes():
    doc = attncc.load_spec("examples/document_mask.yaml")
    sizes = {"batch": 2, "heads": 4, "kv_heads": 2, "seq_q": 24, "seq_k": 77, "head_dim": 16,
             "value_dim": 24}
    assert "doc" in unfit_reason(doc, sizes) and "kv_idx" in unfit_reason(doc, sizes)
    assert unfit_reason(doc, {**sizes, "seq_k": 24}) is None
    assert unfit_reason(attncc.load_spec("examples/relative_bias.yaml"), sizes) is None
    cases = conformance_cases("numpy", specs=[Path("examples/document_mask.yaml")])
    assert cases and all(c.seq_k <= c.seq_q for c in cases)


def test_the_extreme_family_overflows_a_naive_softmax():
    spec = attncc.load_spec("examples/dense.yaml")
    assert exponentiates(spec) and not exponentiates(attncc.load_spec("examples/nystrom.yaml"))
    q, k, v, _ = random_inputs(spec, 2, 24, 77, "float32", score_std=EXTREME_STD)
    scores = (q @ np.swapaxes(np.repeat(k, 2, axis=1), -1, -2)) / 4
    assert 3e2 < scores.std() < 3e3 and np.abs(scores).max() > 1e3
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    assert not np.isfinite(naive).all()

    class NaiveKernel:
        backend = "naive"

        def __call__(self, q, k, v, return_lse=False):
            s = (q @ np.swapaxes(np.repeat(k, 2, axis=1), -1, -2)) / 4
            with np.errstate(over="ignore", invalid="ignore"):
                e = np.exp(s)
                out = (e / e.sum(-1, keepdims=True)) @ np.repeat(v, 2, axis=1)
            return (out, np.log(e.sum(-1))) if return_lse else out

    assert not check_kernel(NaiveKernel(), spec, q, k, v).ok
    assert check_kernel(NaiveKernel(), spec, *random_inputs(spec, 2, 24, 77, "float32")[:3]).ok
    extreme = [c for c in CASES if c.score_std]
    assert extreme and "nystrom" not in {Path(c.spec_path).stem for c in extreme}
