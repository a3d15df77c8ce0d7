"""attncc.integrations.modules.MultiheadAttention: projections owned, any spec, mask conventions
against nn.MultiheadAttention and SDPA, learned inputs, torch.compile(fullgraph=True)."""

import pytest
import torch

from attncc.errors import InputError
from attncc.integrations.modules import MultiheadAttention
from attncc.reference import attend
from attncc.spec.load import load_spec

E, H = 16, 4


def x(batch=2, seq=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, E, generator=gen, dtype=torch.float64)


def matched_pair():
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, dtype=torch.float64)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                               ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias,
                                             ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, theirs


def test_matches_nn_multihead_attention_with_both_masks():
    ours, theirs = matched_pair()
    query, memory = x(seq=5, seed=1), x(seq=7, seed=2)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True  # True = padding, in both
    allowed = torch.rand(5, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[:, 0] = True  # no query row loses every key
    got, weights = ours(query, memory, memory, key_padding_mask=padding, attn_mask=allowed)
    # nn.MultiheadAttention's bool attn_mask is the opposite of SDPA's and ours: True = masked
    want, _ = theirs(query, memory, memory, key_padding_mask=padding, attn_mask=~allowed,
                     need_weights=False)
    assert weights is None
    torch.testing.assert_close(got, want)
    plain, _ = ours(query)
    want_plain, _ = theirs(query, query, query, need_weights=False)
    torch.testing.assert_close(plain, want_plain)


def test_gqa_spec_with_owned_learned_input():
    spec = {"attncc": 1, "name": "alibi_causal", "mask": "kv_idx <= q_idx",
            "score_mod": "score - slope[h] * (q_idx - kv_idx)",
            "inputs": {"slope": {"shape": ["heads"], "dtype": "float64"}}}
    slope = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    torch.manual_seed(0)
    mha = MultiheadAttention(E, H, spec, kv_heads=2, slope=slope, dtype=torch.float64)
    assert isinstance(mha.slope, torch.nn.Parameter)
    assert mha.k_proj.out_features == 2 * E // H
    inp = x()
    out, _ = mha(inp)
    q = mha.q_proj(inp).view(2, 7, H, 4).transpose(1, 2)
    k = mha.k_proj(inp).view(2, 7, 2, 4).transpose(1, 2)
    v = mha.v_proj(inp).view(2, 7, 2, 4).transpose(1, 2)
    core = attend(load_spec(spec), q, k, v, {"slope": mha.slope})
    want = mha.out_proj(core.transpose(1, 2).reshape(2, 7, E))
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    got_g = torch.autograd.grad(out, [mha.slope, mha.q_proj.weight], grad)
    want_g = torch.autograd.grad(want, [mha.slope, mha.q_proj.weight], grad)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w)


def test_compiles_fullgraph_with_padding():
    torch.manual_seed(0)
    mha = MultiheadAttention(E, H, {"attncc": 1, "name": "causal", "mask": "kv_idx <= q_idx"})
    inp = x().float()
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    got, _ = compiled(inp, key_padding_mask=padding)
    want, _ = mha(inp, key_padding_mask=padding)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert mha.q_proj.weight.grad is not None and mha.q_proj.weight.grad.abs().sum() > 0


def test_user_mistakes():
    with pytest.raises(InputError, match="divide"):
        MultiheadAttention(E, 3)
    with pytest.raises(InputError, match="unexpected input 'slopes'"):
        MultiheadAttention(E, H, slopes=torch.ones(H))
    mha = MultiheadAttention(E, H)
    with pytest.raises(InputError, match="True = padding"):
        mha(x().float(), key_padding_mask=torch.zeros(2, 7))
    with pytest.raises(InputError, match="as SDPA"):
        mha(x().float(), attn_mask=torch.zeros(7, 7))
