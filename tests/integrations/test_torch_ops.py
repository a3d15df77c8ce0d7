"""attncc.integrations.ops: the torch.library operators (custom_op, triton_op), their fake and
autograd registrations, opcheck, and torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch
from fullgraph import assert_fullgraph_matches_eager

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
    leaves = (q, k, v, inputs["slope"], model.proj.weight)
    assert_fullgraph_matches_eager(model, model.fn, leaves, q, k, v, inputs)


def test_user_mistakes():
    with pytest.raises(InputError, match="op needs a backend whose library is torch"):
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
    spec = load_spec(ALIBI_PADDED)
    assert fn.op._qualname == f"attncc::triton_{spec.hash[:16]}_" + fn.op._qualname[-8:]
    assert fn.op._qualname in torch._library.triton.triton_ops_to_kernels
    q, k, v, inputs = case(device=device)
    args = fn.args(q, k, v, **inputs)
    plain = [x.detach() for x in args[3]]
    torch.library.opcheck(fn.ops.plan, (*(x.detach() for x in args[:3]), plain))
    torch.library.opcheck(fn.op, args)
    out, lse, thr = fn.op(*args)
    d_out = torch.randn_like(out)
    # the backward op runs without grad (no double backward), as the forward's autograd calls it
    saved = [x.detach() for x in (out, lse, thr)]
    torch.library.opcheck(fn.ops.backward, (*(x.detach() for x in args[:3]), plain, args[4],
                                            args[5], *saved, d_out, torch.zeros_like(lse)))
    got = torch.autograd.grad(out, (q, k, v, inputs["slope"]), d_out)
    want_out = attend(spec, q, k, v, inputs)
    want = torch.autograd.grad(want_out, (q, k, v, inputs["slope"]), d_out)
    torch.testing.assert_close(out, want_out, rtol=2e-3, atol=2e-3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)


def test_triton_op_plan_tables_follow_the_data():
    """The plan op reads the mask's inputs at run time: shorter lengths, fewer key blocks."""
    fn, device = _triton_or_skip()
    q, k, v, inputs = case(device=device, seq=40)
    tables = dict(zip(("fc", "fi", "pc", "pi"), fn.ops.plan(q, k, v, [
        inputs[n] for n in fn.names])[:4], strict=True))
    short = {**inputs, "lengths": torch.tensor([40, 1], dtype=torch.int32, device=device)}
    fewer = dict(zip(("fc", "fi", "pc", "pi"), fn.ops.plan(q, k, v, [
        short[n] for n in fn.names])[:4], strict=True))
    assert tables["fi"].shape == fewer["fi"].shape
    visited = tables["fc"] + tables["pc"]
    assert torch.equal(visited[0], (fewer["fc"] + fewer["pc"])[0])
    assert int((fewer["fc"] + fewer["pc"])[1].sum()) < int(visited[1].sum())


def test_triton_op_compiles_fullgraph_without_graph_break():
    fn, device = _triton_or_skip()
    model = Tiny(fn).to(device)
    q, k, v, inputs = case(device=device)
    leaves = (q, k, v, inputs["slope"], model.proj.weight)
    assert_fullgraph_matches_eager(model, fn, leaves, q, k, v, inputs)


def test_triton_linear_kernels_are_triton_ops_too():
    """Linear attention (the chunked scan kernel) has its own triton_op and backward triton_op
    (more in test_triton_ops_lowrank.py)."""
    _triton_or_skip()
    fn = op({"attncc": 1, "name": "lin", "normalize": "linear", "feature_map": "elu1",
             "mask": "kv_idx <= q_idx"}, backend="triton")
    assert fn.ops is not None and fn.op._qualname.startswith("attncc::triton_")
    assert fn.op._qualname in torch._library.triton.triton_ops_to_kernels
    q, k, v, _ = case(seq=5)
    out = fn(q, k, v)
    assert out.shape == (2, 4, 5, 8)
    spec = load_spec({"attncc": 1, "name": "lin", "normalize": "linear", "feature_map": "elu1",
                      "mask": "kv_idx <= q_idx"})
    torch.testing.assert_close(out, attend(spec, q, k, v, {}))
