"""attncc.integrations.torch: the SDPA-compatible function and the nn.Module wrapper."""

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.errors import InputError
from attncc.integrations.torch import AttnccAttention, sdpa
from attncc.reference import attend


def qkv(heads=4, kv_heads=4, n=33, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_torch_sdpa(is_causal, scale):
    fn = sdpa("examples/dense.yaml")
    q, k, v = qkv()
    got = fn(q, k, v, is_causal=is_causal, scale=scale)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(got, want)


def test_enable_gqa_and_is_causal_on_a_masked_spec():
    fn = sdpa("examples/longformer.yaml")
    q, k, v = qkv(heads=4, kv_heads=2)
    with pytest.raises(InputError, match="enable_gqa"):
        fn(q, k, v)
    got = fn(q, k, v, enable_gqa=True, is_causal=True)
    causal_longformer = attncc.load_spec({
        "attncc": 1, "name": "causal_longformer", "constants": {"window": 16, "n_global": 4},
        "mask": "(abs(q_idx - kv_idx) <= window or q_idx < n_global or kv_idx < n_global) "
                "and kv_idx <= q_idx"})
    torch.testing.assert_close(got, attend(causal_longformer, q, k, v, {}))


def test_refuses_attn_mask_and_dropout():
    fn = sdpa("examples/causal.yaml")
    q, k, v = qkv()
    with pytest.raises(InputError, match="attn_mask"):
        fn(q, k, v, attn_mask=torch.ones(33, 33, dtype=torch.bool))
    with pytest.raises(InputError, match="dropout_p"):
        fn(q, k, v, dropout_p=0.1)
    with pytest.raises(InputError, match="query: expected a 4-D tensor"):
        fn(q[0], k, v)


def test_gradients_flow_through_the_function():
    fn = sdpa("examples/alibi.yaml")
    q, k, v = (x.requires_grad_() for x in qkv())
    slope = torch.linspace(0.1, 0.8, 4, dtype=torch.float64, requires_grad=True)
    fn(q, k, v, slope=slope).sum().backward()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, slope)]
    attend("examples/alibi.yaml", *leaves[:3], {"slope": leaves[3]}).sum().backward()
    for got, want in zip((q, k, v, slope), leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_module_owns_learned_inputs_as_parameters():
    slope = torch.linspace(0.1, 0.8, 4, dtype=torch.float64)
    module = AttnccAttention("examples/alibi.yaml", slope=slope)
    assert [name for name, _ in module.named_parameters()] == ["slope"]
    q, k, v = qkv()
    module(q, k, v).square().sum().backward()
    assert module.slope.grad is not None and module.slope.grad.abs().sum() > 0
    torch.testing.assert_close(module(q, k, v).detach(),
                               attend("examples/alibi.yaml", q, k, v, {"slope": slope}))
    with pytest.raises(InputError, match="unexpected input 'bias'"):
        AttnccAttention("examples/alibi.yaml", bias=slope)


def test_module_keeps_integer_inputs_as_buffers():
    lengths = torch.tensor([10, 33], dtype=torch.int32)
    module = AttnccAttention("examples/key_padding.yaml", lengths=lengths)
    assert "lengths" in dict(module.named_buffers())
    q, k, v = qkv()
    torch.testing.assert_close(module(q, k, v),
                               attend("examples/key_padding.yaml", q, k, v, {"lengths": lengths}))
