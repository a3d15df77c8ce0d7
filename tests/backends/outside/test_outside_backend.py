"""An outside backend (``attncc_dense``, beside this file) registered through a real entry point:
it passes the conformance suite forward and backward, compiles through ``attncc.compile`` and
is exposed as a torch op by the generic ``attncc.integrations.ops.op``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc.backends import registry
from attncc.testing import conformance_cases, random_inputs, run_case

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[2] / "examples"
SPECS = [EXAMPLES / f"{name}.yaml"
         for name in ("dense", "causal", "alibi", "document_mask", "sliding_window")]
CASES = conformance_cases("dense", ("float32", "float64"), library="torch", specs=SPECS,
                          sizes=((1, 1, 1, "default"), (2, 37, 37, "default"),
                                 (2, 24, 77, "default")), extreme_sizes=((1, 61, 19, "default"),))


@pytest.fixture(scope="module")
def dense_installed(tmp_path_factory):
    """``attncc_dense`` installed as a distribution with an ``attncc.backends`` entry point."""
    site = tmp_path_factory.mktemp("site")
    info = site / "attncc_dense-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attncc-dense\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[attncc.backends]\n"
                                           "dense = attncc_dense:DenseBackend\n")
    sys.path[:0] = [str(site), str(HERE)]
    registry.refresh()
    yield registry.get("dense")
    sys.path.remove(str(site))
    sys.path.remove(str(HERE))
    sys.modules.pop("attncc_dense", None)
    registry.refresh()


def test_the_entry_point_registers_the_backend(dense_installed):
    assert "dense" in registry.names()
    assert type(dense_installed).__module__ == "attncc_dense"
    kernel = attncc.compile(SPECS[1], backend="dense")
    assert kernel.backend == "dense" and "backend dense" in kernel.selection


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance_forward_and_backward(dense_installed, case):
    report = run_case(case, refusals="fail")
    assert any(c.quantity == "grad q" for c in report.checks)


@pytest.mark.parametrize("name", ["causal", "alibi"])
def test_a_torch_op_through_the_generic_custom_op(dense_installed, name):
    from attncc.integrations.ops import op

    spec = attncc.load_spec(EXAMPLES / f"{name}.yaml")
    fn = op(spec, backend="dense")
    q, k, v, inputs = random_inputs(spec, 1, 16, 16, "float64", 0, "torch")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    torch.library.opcheck(fn.op, fn.args(q, k, v, **inputs))
    compiled = torch.compile(lambda q, k, v: fn(q, k, v, **inputs), fullgraph=True,
                             backend="aot_eager")
    got = compiled(q, k, v)
    got.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    want = torch.as_tensor(attncc.reference(spec, q.detach(), k.detach(), v.detach(), **inputs))
    torch.testing.assert_close(got.detach(), want)
    for x in (q, k, v):
        x.grad = None
    fn(q, k, v, **inputs).sum().backward()
    for g, x in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, x.grad)
