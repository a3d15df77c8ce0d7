"""attncc.integrations.ops: the torch.library operators (custom_op, triton_op), their fake and
autograd registrations, opcheck, and torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch

from attncc.backends import registry
from attncc.errors import BackendError, InputError
from attncc.integrations.ops import op
from attncc.reference import attend
from attncc.spec.load import load_spec

ALIBI_PADDED = {
    "attncc": 1, "name": "alibi_padded", "mask": "kv_idx <= q_idx and kv_idx < lengths[b]",
    "score_mod": "score - slope[h] * (q_idx - kv_idx)",
    "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"},
               "lengths": {"shape": ["batch"], "dtype": "int32"}}}


def case(dtype=torch.float32, device="cpu", seq=9):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()

    q, k, v = rand(2, 4, seq, 8), rand(2, 2, seq, 8), rand(2, 2, seq, 8)
    slope = (torch.rand(4, generator=gen, dtype=dtype) / 2).to(device).requires_grad_()
    lengths = torch.tensor([seq, seq - 4], dtype=torch.int32, device=device)
    return q, k, v, {"slope": slope, "lengths": lengths}


def test_opcheck_custom_op():
    fn = op(ALIBI_PADDED)
    q, k, v, inputs = case()
    torch.library.opcheck(fn.op, (q, k, v, fn.key, [inputs[n] for n in fn.names]))


def test_opcheck_without_inputs_gqa():
    fn = op({"attncc": 1, "name": "causal", "mask": "kv_idx <= q_idx"})
    q, k, v, _ = case(seq=5)
    torch.library.opcheck(fn.op, (q, k, v, fn.key, []))


def test_forward_and_gradients_match_float64_reference():
    fn = op(ALIBI_PADDED)
    q, k, v, inputs = case(torch.float64)
    out = fn(q, k, v, **inputs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, inputs["slope"]), grad)
    want_out = attend(load_spec(ALIBI_PADDED), q, k, v, inputs)
    want = torch.autograd.grad(want_out, (q, k, v, inputs["slope"]), grad)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


class Tiny(torch.nn.Module):
    """A projection, the attncc op, a projection: the shape of an attention layer."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, q, k, v, slope, lengths):
        return self.out(self.fn(self.proj(q), k, v, slope=slope, lengths=lengths))


def test_compiles_fullgraph_without_graph_break():
    model = Tiny(op(ALIBI_PADDED))
    q, k, v, inputs = case()
    explain = torch._dynamo.explain(model)(q, k, v, **inputs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, **inputs)
    got.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v, inputs["slope"], model.proj.weight)]
    for x in (q, k, v, inputs["slope"], model.proj.weight):
        x.grad = None
    want = model(q, k, v, **inputs)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    for g, x in zip(grads, (q, k, v, inputs["slope"], model.proj.weight), strict=True):
        torch.testing.assert_close(g, x.grad)


def test_user_mistakes():
    with pytest.raises(InputError, match="expected 'torch' or 'triton'"):
        op(ALIBI_PADDED, backend="numpy")
    fn = op(ALIBI_PADDED)
    q, k, v, inputs = case()
    with pytest.raises(InputError, match="missing \\['lengths'\\]"):
        fn(q, k, v, slope=inputs["slope"])


def _triton_or_skip():
    backends = registry.available()
    if "triton" not in backends:
        pytest.skip("the triton backend is not registered (no attncc_triton entry point)")
    if isinstance(backends["triton"], BackendError):
        pytest.skip(f"the triton backend does not load here: {backends['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        fn = op(ALIBI_PADDED, backend="triton")
        q, k, v, inputs = case(device=device)
        fn(q, k, v, **inputs)
    except BackendError as err:
        pytest.skip(f"the triton backend cannot run here: {err}")
    return fn, device


def test_triton_op_opcheck_and_gradients():
    fn, device = _triton_or_skip()
    q, k, v, inputs = case(device=device)
    torch.library.opcheck(fn.op, (q, k, v, fn.key, [inputs[n] for n in fn.names]))
    out = fn(q, k, v, **inputs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, inputs["slope"]), grad)
    want_out = attend(load_spec(ALIBI_PADDED), q, k, v, inputs)
    want = torch.autograd.grad(want_out, (q, k, v, inputs["slope"]), grad)
    torch.testing.assert_close(out, want_out, rtol=2e-3, atol=2e-3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
