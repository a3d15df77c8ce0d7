"""The Triton backend's linear-attention, Linformer and Nyström lowerings as ``triton_op``s:
opcheck, values and gradients against the float64 reference (the conformance rule), and a model
compiled with ``torch.compile(fullgraph=True)`` without a graph break."""

import pytest
import torch
from fullgraph import assert_fullgraph_matches_eager

from attncc.api import compile as compile_spec
from attncc.backends import registry
from attncc.errors import BackendError
from attncc.integrations.ops import op
from attncc.spec.load import load_spec
from attncc.testing import check_kernel, examples_dir, random_inputs

#: (example, seq_q, seq_k): causal linear, non-causal linear (performer), Linformer, Nyström.
CASES = [("linear_elu", 33, 33), ("performer", 24, 40), ("linformer", 24, 40),
         ("nystrom", 32, 48)]
IDS = [c[0] for c in CASES]


def _spec(name):
    return load_spec(examples_dir() / f"{name}.yaml")


@pytest.fixture(scope="module")
def device():
    backends = registry.available()
    if "triton" not in backends or isinstance(backends["triton"], BackendError):
        pytest.skip(f"the triton backend does not load here: {backends.get('triton')}")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _call(name, seq_q, seq_k, device, dtype="float32"):
    spec = _spec(name)
    fn = op(spec, backend="triton")
    q, k, v, inputs = random_inputs(spec, 2, seq_q, seq_k, dtype, library="torch",
                                    device=device)
    return spec, fn, q, k, v, inputs


def _as_kernel(fn):
    """``fn.op`` called as a Kernel (with the lse where the op returns one), for check_kernel."""
    def kernel(q, k, v, return_lse=False, **inputs):
        result = fn.op(*fn.args(q, k, v, **inputs))
        return (result[0], result[1]) if return_lse else result[0]

    kernel.backward = True
    return kernel


@pytest.mark.parametrize(("name", "seq_q", "seq_k"), CASES, ids=IDS)
def test_every_lowering_is_a_triton_op(device, name, seq_q, seq_k):
    spec, fn, *_ = _call(name, seq_q, seq_k, device)
    assert fn.ops is not None
    assert fn.op._qualname.startswith(f"attncc::triton_{spec.hash[:16]}_")
    assert fn.op._qualname in torch._library.triton.triton_ops_to_kernels
    assert fn.ops.backward._qualname == fn.op._qualname + "_backward"


@pytest.mark.parametrize(("name", "seq_q", "seq_k"), CASES, ids=IDS)
def test_opcheck_forward_and_backward(device, name, seq_q, seq_k):
    _, fn, q, k, v, inputs = _call(name, seq_q, seq_k, device)
    args = fn.args(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), **inputs)
    torch.library.opcheck(fn.op, args)
    outputs = fn.op(*args)
    d_out = torch.randn_like(outputs[0])
    plain = [x.detach() if isinstance(x, torch.Tensor) else
             [t.detach() for t in x] if isinstance(x, list) else x for x in args]
    # the backward takes the forward's arguments and outputs, d_out and (but for Nyström, whose
    # other outputs are saved state) the gradient of the second output; it runs without grad
    extra = [] if name == "nystrom" else [torch.zeros_like(outputs[1])]
    torch.library.opcheck(fn.ops.backward, (*plain, *(x.detach() for x in outputs), d_out,
                                            *extra))


@pytest.mark.parametrize(("name", "seq_q", "seq_k"), CASES, ids=IDS)
def test_values_and_gradients_meet_the_conformance_rule(device, name, seq_q, seq_k):
    spec, fn, q, k, v, inputs = _call(name, seq_q, seq_k, device)
    report = check_kernel(_as_kernel(fn), spec, q, k, v, inputs, grads=True)
    assert report.ok, str(report)
    assert any(c.quantity == "grad q" for c in report.checks)


@pytest.mark.parametrize(("name", "seq_q", "seq_k"), CASES, ids=IDS)
def test_gradients_equal_autograd_of_the_eager_lowering_in_float64(device, name, seq_q,
                                                                   seq_k):
    """The hand-written backward against torch autograd through the same lowering (the
    generated module's differentiable ``attention``), to rounding."""
    spec, fn, q, k, v, inputs = _call(name, seq_q, seq_k, device, "float64")
    floats = [n for n in fn.names if inputs[n].is_floating_point()]
    leaves = [q, k, v, *(inputs[n] for n in floats)]

    def grads(call):
        for x in leaves:
            x.grad = None
            x.requires_grad_()
        out = call(q, k, v, **inputs)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype,
                                    device=out.device).reshape(out.shape))
        return out.detach(), [x.grad.clone() for x in leaves]

    got_out, got = grads(fn)
    want_out, want = grads(compile_spec(spec, backend="triton"))
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


class Layer(torch.nn.Module):
    """A projection of q, the attncc op, a projection: the shape of an attention layer."""

    def __init__(self, fn, head_dim, value_dim):
        super().__init__()
        self.fn = fn
        self.proj = torch.nn.Linear(head_dim, head_dim, dtype=torch.float32)
        self.out = torch.nn.Linear(value_dim, value_dim, dtype=torch.float32)

    def forward(self, q, k, v, **inputs):
        return self.out(self.fn(self.proj(q), k, v, **inputs))


@pytest.mark.parametrize(("name", "seq_q", "seq_k"), CASES, ids=IDS)
def test_compiles_fullgraph_without_graph_break(device, name, seq_q, seq_k):
    _, fn, q, k, v, inputs = _call(name, seq_q, seq_k, device)
    model = Layer(fn, q.shape[-1], v.shape[-1]).to(device)
    leaves = [q, k, v, *(x for x in inputs.values() if x.is_floating_point()),
              model.proj.weight]
    for x in leaves[:-1]:
        x.requires_grad_()
    assert_fullgraph_matches_eager(model, fn, leaves, q, k, v, inputs)
