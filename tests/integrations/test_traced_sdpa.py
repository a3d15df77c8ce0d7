"""Under ``torch.compile`` the function ``attncc.integrations.ops.op`` returns traces the torch
backend's sdpa path as plain torch ops (``Kernel.traceable``): the graph holds
``scaled_dot_product_attention`` and not the attncc op, with eager attncc's values and gradients;
calls that path does not serve, and calls the prologue would reject, stay on the library op."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from attncc.errors import InputError
from attncc.integrations.ops import op
from attncc.reference import attend
from attncc.spec.load import load_spec

CAUSAL = {"attncc": 1, "name": "traced_causal", "mask": "kv_idx <= q_idx"}
DENSE = {"attncc": 1, "name": "traced_dense", "scale": "0.3"}
KV_CACHE = {"attncc": 1, "name": "traced_kv_cache", "mask": "kv_idx <= q_idx + seq_k - seq_q"}
OP = "attncc.attention.default"


def compiled(fn):
    """``fn`` under ``torch.compile(fullgraph=True)`` (aot_eager) and the set of the traced FX
    graphs' call targets, filled as it compiles."""
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend), targets


def has_sdpa(targets) -> bool:
    return any("scaled_dot_product_attention" in t for t in targets)


def tensors(heads=4, kv_heads=2, seq_q=24, seq_k=24, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    return rand(2, heads, seq_q, dim), rand(2, kv_heads, seq_k, dim), rand(2, kv_heads, seq_k, dim)


def values_and_grads(fn, q, k, v, **inputs):
    out = fn(q, k, v, **inputs)
    grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    leaves = (q, k, v, *(x for x in inputs.values() if x.requires_grad))
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("spec,seq_q", [(CAUSAL, 24), (DENSE, 24), (KV_CACHE, 9),
                                        (KV_CACHE, 1)])
def test_sdpa_specs_trace_sdpa_with_eager_values_and_gradients(spec, seq_q):
    fn = op(spec)
    run, targets = compiled(fn)
    q, k, v = tensors(seq_q=seq_q)
    got, got_grads = values_and_grads(run, q, k, v)
    assert has_sdpa(targets) and OP not in targets
    want, want_grads = values_and_grads(fn, q, k, v)
    ref, ref_grads = values_and_grads(lambda *a: attend(load_spec(spec), *a, {}), q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, ref)
    for g, w, r in zip(got_grads, want_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(g, r)


def test_decoding_lengths_share_a_compiled_graph_per_bucket():
    fn = op(KV_CACHE)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    run = torch.compile(fn, fullgraph=True, backend=counter)
    for seq_k in range(33, 41):  # one shape bucket (q1-k64): a recompile at most once
        q, k, v = tensors(seq_q=1, seq_k=seq_k)
        with torch.no_grad():
            torch.testing.assert_close(run(q, k, v), fn(q, k, v))
    assert counter.frame_count <= 2
    assert any(has_sdpa(str(n.target) for n in g.graph.nodes) for g in counter.graphs)


@pytest.mark.parametrize("spec,config,seq_q,seq_k", [
    ("examples/alibi.yaml", None, 40, 40), ("examples/sliding_window.yaml", None, 40, 40),
    (CAUSAL, {"use_sdpa": False}, 24, 24),
    (KV_CACHE, None, 30, 20)])  # bottom-right with more queries than keys
def test_calls_the_sdpa_path_does_not_serve_stay_on_the_op(spec, config, seq_q, seq_k):
    fn = op(spec, config=config)
    run, targets = compiled(fn)
    q, k, v = tensors(seq_q=seq_q, seq_k=seq_k)
    inputs = {"slope": torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
              } if "alibi" in str(spec) else {}
    got, got_grads = values_and_grads(run, q, k, v, **inputs)
    assert OP in targets and not has_sdpa(targets)
    want, want_grads = values_and_grads(fn, q, k, v, **inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


BAD = {
    "rank": (torch.randn(8, 16, 8), torch.randn(2, 16, 8), torch.randn(2, 16, 8)),
    "dtypes": (torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8, dtype=torch.float64),
               torch.randn(1, 2, 16, 8)),
    "heads": (torch.randn(1, 3, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)),
    "head_dim": (torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 8)),
    "fixed_heads": (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8),
                    torch.randn(1, 2, 16, 8)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_call_the_prologue_rejects_gets_its_input_error_under_compile(case):
    fn = op({**CAUSAL, "name": "traced_fixed", "heads": 4} if case == "fixed_heads" else CAUSAL)
    with pytest.raises(InputError) as eager:
        fn(*BAD[case])
    run, _ = compiled(fn)
    with pytest.raises(InputError) as traced:
        run(*BAD[case])
    assert str(traced.value) == str(eager.value)
