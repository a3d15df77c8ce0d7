"""attncc.reference on tiny cases computed by hand, against hand-written NumPy and torch SDPA.

Each hand case is small enough (1 head, 1-3 positions) that the expected numbers are written out in
the test from the formula of DESIGN §3. Variants SDPA can express (a bool or additive float mask,
GQA) are compared with it in float64; ``attend`` on torch float64 tensors must equal the NumPy
reference and give exact gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from spec_inputs import random_case

import attncc
from attncc.errors import InputError
from attncc.reference import attend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def t(rows):
    """A (1, 1, n, d) float64 array from a list of n rows."""
    return np.asarray(rows, dtype=np.float64)[None, None]


def spec(**keys):
    return attncc.load_spec({"attncc": 1, "scale": 1, **keys})


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


Q = t([[1.0, 0.0], [0.0, 1.0]])
K = t([[1.0, 0.0], [0.0, 1.0]])
V = t([[1.0, 2.0], [3.0, 4.0]])
E = math.e


def test_softmax_by_hand():
    out, lse = attncc.reference(spec(), Q, K, V, return_lse=True)
    # row 0: scores [1, 0]; row 1: scores [0, 1]
    w = E / (E + 1)
    np.testing.assert_allclose(out[0, 0], [[w * 1 + (1 - w) * 3, w * 2 + (1 - w) * 4],
                                           [(1 - w) * 1 + w * 3, (1 - w) * 2 + w * 4]])
    np.testing.assert_allclose(lse[0, 0], [math.log(E + 1)] * 2)


def test_default_scale_is_one_over_sqrt_head_dim():
    out = attncc.reference({"attncc": 1}, Q, K, V)
    w = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    np.testing.assert_allclose(out[0, 0, 0], [w * 1 + (1 - w) * 3, w * 2 + (1 - w) * 4])


def test_fully_masked_row_gives_zero_and_minus_infinity():
    out, lse = attncc.reference(spec(mask="kv_idx < q_idx"), Q, K, V, return_lse=True)
    np.testing.assert_array_equal(out[0, 0, 0], [0.0, 0.0])
    assert lse[0, 0, 0] == -math.inf
    # row 1 keeps only key 0, whose score is q1.k0 = 0
    np.testing.assert_allclose(out[0, 0, 1], [1.0, 2.0])
    assert lse[0, 0, 1] == 0.0


def test_sigmoid_by_hand_with_log_bias():
    q, k, v = t([[1.0, 2.0]]), t([[1.0, 0.0], [0.5, -1.0]]), t([[1.0], [10.0]])
    out = attncc.reference(spec(normalize="sigmoid", score_mod="score - log(seq_k)"), q, k, v)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # scores 1 and -1.5, minus log 2; sigmoid weights are not normalized
    expected = sig(1 - math.log(2)) * 1 + sig(-1.5 - math.log(2)) * 10
    np.testing.assert_allclose(out[0, 0, 0, 0], expected)


def test_sigmoid_has_no_lse():
    with pytest.raises(InputError, match="log-sum-exp"):
        attncc.reference(spec(normalize="sigmoid"), Q, K, V, return_lse=True)


def test_hard_attention_takes_the_best_key():
    q, k = t([[1.0], [-1.0]]), t([[0.5], [2.0], [-3.0]])
    v = t([[1.0], [2.0], [3.0]])
    out, lse = attncc.reference(spec(normalize="topk", topk=1), q, k, v, return_lse=True)
    # row 0 scores [0.5, 2, -3] -> key 1; row 1 scores [-0.5, -2, 3] -> key 2
    np.testing.assert_array_equal(out[0, 0, :, 0], [2.0, 3.0])
    np.testing.assert_allclose(lse[0, 0], [2.0, 3.0])


def test_topk_two_of_three_by_hand():
    q, k, v = t([[1.0]]), t([[0.5], [2.0], [-3.0]]), t([[1.0], [2.0], [3.0]])
    out = attncc.reference(spec(normalize="topk", topk=2), q, k, v)
    w = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5))
    np.testing.assert_allclose(out[0, 0, 0, 0], w * 2 + (1 - w) * 1)


def test_topk_with_k_past_the_kept_count_is_softmax():
    case = random_case({"attncc": 1}, seq_q=6, seed=3)
    causal = {"attncc": 1, "mask": "kv_idx <= q_idx"}
    # K = 4 keeps all of the first rows' (1..4) kept keys, and 4 of the later rows' 5 and 6
    top = attncc.reference({**causal, "normalize": "topk", "topk": 4}, case.q, case.k, case.v)
    soft = attncc.reference(causal, case.q, case.k, case.v)
    np.testing.assert_allclose(top[:, :, :4], soft[:, :, :4], rtol=1e-12)
    assert not np.allclose(top[:, :, 5], soft[:, :, 5])
    big = attncc.reference({**causal, "normalize": "topk", "topk": 99}, case.q, case.k, case.v)
    np.testing.assert_allclose(big, soft, rtol=1e-12)


def test_linear_elu1_causal_by_hand():
    q, k, v = t([[0.5], [-1.0]]), t([[1.0], [-0.5]]), t([[2.0], [4.0]])
    out = attncc.reference(spec(normalize="linear", mask="kv_idx <= q_idx"), q, k, v)
    # phi = elu + 1: phi(0.5) = 1.5, phi(-1) = e^-1, phi(1) = 2, phi(-0.5) = e^-0.5
    a, b = math.exp(-1) * 2, math.exp(-1) * math.exp(-0.5)
    np.testing.assert_allclose(out[0, 0, :, 0], [2.0, (a * 2 + b * 4) / (a + b)])


def test_linear_relu_zero_denominator_gives_zero():
    q, k, v = t([[-1.0], [1.0]]), t([[1.0], [2.0]]), t([[5.0], [7.0]])
    out = attncc.reference(spec(normalize="linear", feature_map="relu"), q, k, v)
    # phi(q0) = 0, so row 0 has a zero denominator; row 1: weights 1*1, 1*2
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, (5 + 2 * 7) / 3])


def test_performer_estimates_softmax_attention():
    s = {"attncc": 1, "normalize": "linear", "feature_map": "performer", "features": 4096}
    case = random_case(s, seq_q=8, head_dim=4, seed=5)
    q, k = case.q * 0.5, case.k * 0.5
    approx = attncc.reference(s, q, k, case.v, **case.inputs)
    exact = attncc.reference({"attncc": 1}, q, k, case.v)
    assert np.max(np.abs(approx - exact)) < 0.1


def test_memory_tokens_are_always_visible_and_unmodified():
    q, k, v = t([[1.0], [2.0]]), t([[0.5], [-1.0]]), t([[3.0], [5.0]])
    mem_k, mem_v = np.array([[[1.5]]]), np.array([[[-2.0]]])
    s = spec(memory_tokens=1, mask="kv_idx < q_idx", score_mod="score + 1")
    out, lse = attncc.reference(s, q, k, v, return_lse=True, mem_k=mem_k, mem_v=mem_v)
    # row 0: no real key kept, the memory token alone
    np.testing.assert_allclose(out[0, 0, 0, 0], -2.0)
    np.testing.assert_allclose(lse[0, 0, 0], 1.5)
    # row 1: memory score 2*1.5 = 3 (no +1), key 0 score 2*0.5 + 1 = 2
    w = math.exp(3) / (math.exp(3) + math.exp(2))
    np.testing.assert_allclose(out[0, 0, 1, 0], w * -2 + (1 - w) * 3)
    np.testing.assert_allclose(lse[0, 0, 1], math.log(math.exp(3) + math.exp(2)))


def test_additive_score_by_hand():
    q, k, v = t([[0.5, -1.0]]), t([[1.0, 0.0], [-0.5, 2.0]]), t([[1.0], [4.0]])
    w = np.array([[2.0, -1.0]])
    out = attncc.reference({"attncc": 1, "score": "additive"}, q, k, v, w=w)
    s0 = 2 * math.tanh(1.5) - math.tanh(-1.0)
    s1 = 2 * math.tanh(0.0) - math.tanh(1.0)
    p = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    np.testing.assert_allclose(out[0, 0, 0, 0], p * 1 + (1 - p) * 4)


def test_linformer_is_softmax_over_projected_keys():
    s = {"attncc": 1, "lowrank": {"method": "linformer", "rank": 3}}
    case = random_case(s, batch=1, heads=2, seq_q=5, seq_k=7, head_dim=4, seed=2)
    out, lse = attncc.reference(s, case.q, case.k, case.v, return_lse=True, **case.inputs)
    e, f = case.inputs["E"], case.inputs["F"]
    for h in range(2):
        kp, vp = e @ case.k[0, h], f @ case.v[0, h]
        scores = case.q[0, h] @ kp.T / 2.0
        np.testing.assert_allclose(out[0, h], softmax(scores) @ vp, rtol=1e-12)
        np.testing.assert_allclose(lse[0, h], np.log(np.exp(scores).sum(-1)), rtol=1e-12)


def test_nystrom_with_every_position_a_landmark_is_softmax():
    s = {"attncc": 1, "lowrank": {"method": "nystrom", "landmarks": 6}}
    case = random_case(s, seq_q=6, head_dim=4, seed=4)
    out = attncc.reference(s, case.q, case.k, case.v)
    np.testing.assert_allclose(out, attncc.reference({"attncc": 1}, case.q, case.k, case.v),
                               rtol=1e-8, atol=1e-10)


def test_nystrom_landmarks_are_segment_means():
    s = {"attncc": 1, "scale": 1, "lowrank": {"method": "nystrom", "landmarks": 2}}
    case = random_case(s, batch=1, heads=1, seq_q=4, head_dim=3, seed=6)
    q, k, v = case.q[0, 0], case.k[0, 0], case.v[0, 0]
    ql, kl = q.reshape(2, 2, 3).mean(1), k.reshape(2, 2, 3).mean(1)
    expected = softmax(q @ kl.T) @ np.linalg.pinv(softmax(ql @ kl.T)) @ softmax(ql @ k.T) @ v
    np.testing.assert_allclose(attncc.reference(s, case.q, case.k, case.v)[0, 0], expected,
                               rtol=1e-10)


def test_nystrom_needs_divisible_lengths():
    s = {"attncc": 1, "lowrank": {"method": "nystrom", "landmarks": 4}}
    case = random_case({"attncc": 1}, seq_q=6)
    with pytest.raises(InputError, match="divisible by 4"):
        attncc.reference(s, case.q, case.k, case.v)


def test_gqa_query_head_h_reads_kv_head_h_over_group():
    s = {"attncc": 1, "heads": 4, "kv_heads": 2, "mask": "kv_idx <= q_idx"}
    case = random_case(s, seq_q=5, seed=7)
    out = attncc.reference(s, case.q, case.k, case.v)
    one = {"attncc": 1, "mask": "kv_idx <= q_idx"}
    for h in range(4):
        sl = slice(h, h + 1)
        kv = slice(h // 2, h // 2 + 1)
        expected = attncc.reference(one, case.q[:, sl], case.k[:, kv], case.v[:, kv])
        np.testing.assert_allclose(out[:, sl], expected, rtol=1e-12)


def test_score_mod_reads_per_head_inputs():
    s = spec(score_mod="score - slope[h] * (q_idx - kv_idx)", mask="kv_idx <= q_idx",
             inputs={"slope": {"shape": ["heads"]}})
    out = attncc.reference(s, Q, K, V, slope=np.array([2.0]))
    # row 1: scores q1.k0 - 2*1 = -2 and q1.k1 = 1
    w = math.exp(1) / (math.exp(1) + math.exp(-2))
    np.testing.assert_allclose(out[0, 0, 1], [(1 - w) * 1 + w * 3, (1 - w) * 2 + w * 4])


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "missing input 'slope'"),
    ({"slope": np.ones(3)}, r"slope: expected shape \(2,\)"),
    ({"slope": np.ones(2), "bias": np.ones(2)}, "unexpected input 'bias'"),
    ({"slope": np.ones(2, dtype=bool)}, "expected a float dtype"),
])
def test_bad_inputs_are_named(inputs, message):
    s = {"attncc": 1, "score_mod": "score * slope[h]", "inputs": {"slope": {"shape": ["heads"]}}}
    case = random_case({"attncc": 1}, heads=2)
    with pytest.raises(InputError, match=message):
        attncc.reference(s, case.q, case.k, case.v, **inputs)


def test_bad_tensors_are_named():
    case = random_case({"attncc": 1, "heads": 2})
    with pytest.raises(InputError, match="q: expected 4 dimensions"):
        attncc.reference({"attncc": 1}, case.q[0], case.k, case.v)
    with pytest.raises(InputError, match="fixes heads = 8"):
        attncc.reference({"attncc": 1, "heads": 8}, case.q, case.k, case.v)
    with pytest.raises(InputError, match="k: expected shape"):
        attncc.reference({"attncc": 1}, case.q, case.k[:, :, :3], case.v)


def test_out_of_range_input_index_is_named():
    s = {"attncc": 1, "mask": "kv_idx < lengths[q_idx]",
         "inputs": {"lengths": {"shape": [2], "dtype": "int32"}}}
    case = random_case({"attncc": 1}, seq_q=3)
    with pytest.raises(InputError, match="'lengths' is indexed outside"):
        attncc.reference(s, case.q, case.k, case.v, lengths=np.array([1, 2], dtype=np.int32))


# --- against torch SDPA, float64 -------------------------------------------------------------

def sdpa(case, mask=None, **kw):
    q, k, v = (torch.from_numpy(x) for x in (case.q, case.k, case.v))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw).numpy()


def positions(sq, sk):
    return np.arange(sq)[:, None], np.arange(sk)[None, :]


def check(spec_dict, case, expected):
    out = attncc.reference(spec_dict, case.q, case.k, case.v, **case.inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_sdpa_dense_and_causal():
    case = random_case({"attncc": 1}, heads=3, seq_q=9, head_dim=5, seed=10)
    check({"attncc": 1}, case, sdpa(case))
    check({"attncc": 1, "mask": "kv_idx <= q_idx"}, case, sdpa(case, is_causal=True))
    check({"attncc": 1, "scale": 0.3}, case, sdpa(case, scale=0.3))


def test_sdpa_sliding_window():
    s = attncc.load_spec(EXAMPLES / "sliding_window.yaml")
    case = random_case(s, seq_q=70, seed=11)
    i, j = positions(70, 70)
    check(s, case, sdpa(case, (j <= i) & (i - j < 32)))


def test_sdpa_alibi_as_additive_float_mask():
    s = attncc.load_spec(EXAMPLES / "alibi.yaml")
    case = random_case(s, heads=4, seq_q=12, seed=12)
    i, j = positions(12, 12)
    slope = case.inputs["slope"][:, None, None]
    bias = np.where(j <= i, -slope * (i - j), -np.inf)
    check(s, case, sdpa(case, bias[None]))


def test_sdpa_relative_bias_as_additive_float_mask():
    s = attncc.load_spec(EXAMPLES / "relative_bias.yaml")
    case = random_case(s, heads=2, seq_q=6, seq_k=9, seed=13)
    i, j = positions(6, 9)
    bias = case.inputs["bias"][:, i - j + 9 - 1]
    check(s, case, sdpa(case, bias[None]))


def test_sdpa_gqa():
    s = attncc.load_spec(EXAMPLES / "gqa.yaml")
    case = random_case(s, seq_q=10, seed=14)
    assert case.sizes["heads"] // case.sizes["kv_heads"] == 4
    check(s, case, sdpa(case, is_causal=True, enable_gqa=True))


def test_sdpa_key_padding():
    s = attncc.load_spec(EXAMPLES / "key_padding.yaml")
    case = random_case(s, batch=3, seq_q=5, seq_k=11, seed=15)
    case.inputs["lengths"] = np.array([1, 7, 11], dtype=np.int32)
    keep = np.arange(11)[None, :] < case.inputs["lengths"][:, None]
    check(s, case, sdpa(case, keep[:, None, None, :]))


def test_sdpa_decoding_is_bottom_right_causal():
    s = attncc.load_spec(EXAMPLES / "decoding.yaml")
    case = random_case(s, seq_q=3, seq_k=10, seed=16)
    i, j = positions(3, 10)
    check(s, case, sdpa(case, j <= i + 10 - 3))
    # the last query sees every key, as unmasked attention does
    out = attncc.reference(s, case.q, case.k, case.v)
    np.testing.assert_allclose(out[:, :, -1:], sdpa(case)[:, :, -1:], rtol=1e-10)


# --- attend on torch float64 ------------------------------------------------------------------

TORCH_SPECS = ["alibi.yaml", "gqa.yaml", "memory_tokens.yaml", "linear_elu.yaml",
               "nystrom.yaml", "topk.yaml", "document_mask.yaml", "additive.yaml"]


def as_torch(case):
    convert = torch.from_numpy
    return ([convert(x) for x in (case.q, case.k, case.v)],
            {n: convert(x) for n, x in case.inputs.items()})


@pytest.mark.parametrize("name", TORCH_SPECS)
def test_attend_on_torch_float64_equals_reference(name):
    s = attncc.load_spec(EXAMPLES / name)
    case = random_case(s, seq_q=16, seed=17)
    (q, k, v), inputs = as_torch(case)
    out = attend(s, q, k, v, inputs)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    expected = attncc.reference(s, case.q, case.k, case.v, **case.inputs)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["alibi.yaml", "softcap.toml", "linear_elu.yaml"])
def test_attend_gradients_pass_gradcheck(name):
    s = attncc.load_spec(EXAMPLES / name)
    case = random_case(s, batch=1, heads=2, seq_q=4, head_dim=3, seed=18)
    (q, k, v), inputs = as_torch(case)
    tensors = [x.clone().requires_grad_(True) for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: attend(s, q, k, v, inputs), tensors)


def test_reference_takes_torch_tensors_of_any_float_dtype():
    s = attncc.load_spec(EXAMPLES / "alibi.yaml")
    case = random_case(s, seq_q=8, seed=19)
    (q, k, v), inputs = as_torch(case)
    out = attncc.reference(s, q.float(), k.float(), v.float(),
                           **{n: x.float() for n, x in inputs.items()})
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    expected = attncc.reference(s, case.q, case.k, case.v, **case.inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", ["softmax", "sigmoid"])
def test_attend_gradient_is_finite_with_extreme_removed_scores(normalize):
    """A removed pair whose score overflows exp must not turn the gradient into nan."""
    s = {"attncc": 1, "scale": 1, "mask": "kv_idx <= q_idx", "normalize": normalize}
    q = torch.tensor([[[[1.0], [1.0]]]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[[[-900.0], [900.0]]]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[[[1.0], [2.0]]]], dtype=torch.float64, requires_grad=True)
    out = attend(s, q, k, v, {})
    out.sum().backward()
    for x in (q, k, v):
        assert torch.all(torch.isfinite(x.grad))
    assert torch.all(torch.isfinite(out))


def test_tensors_on_different_devices_are_one_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(attncc.InputError, match="expected one device"):
        attend(attncc.load_spec({"attncc": 1}), q, q.to("meta"), q, {})


def test_a_scale_that_divides_by_zero_at_call_time_is_an_input_error():
    spec = attncc.load_spec({"attncc": 1, "scale": "1/(head_dim - 32)"})
    q = np.zeros((1, 1, 4, 32))
    with pytest.raises(attncc.InputError, match="expected a finite real number"):
        attncc.reference(spec, q, q, q)
