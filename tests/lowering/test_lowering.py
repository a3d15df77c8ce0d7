"""The shared lowering layer (attncc.lowering) on NumPy arrays and torch tensors, autograd too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attncc
from attncc.errors import InputError
from attncc.ir.graph import attention_node
from attncc.lowering.env import Layout, merge_heads, shared_kv, split_heads
from attncc.lowering.features import divide, feature_map
from attncc.lowering.lowrank import linformer, nystrom
from attncc.lowering.prologue import prologue
from attncc.lowering.states import SigmoidState, SoftmaxState, TopkThreshold
from attncc.passes.pipeline import lower
from attncc.testing import random_inputs


def tiles_of(s, v, keep, width=16):
    for start in range(0, s.shape[-1], width):
        cols = slice(start, start + width)
        yield s[..., cols], v[..., cols, :], keep[..., cols]


def dense_softmax(s, v, keep):
    masked = torch.where(keep, s, -torch.inf)
    kept = keep.any(-1, keepdim=True)
    weights = torch.exp(masked - torch.where(kept, masked.amax(-1, keepdim=True), 0.0))
    total = weights.sum(-1, keepdim=True)
    return (weights / torch.where(kept, total, 1.0)) @ v


@pytest.mark.parametrize("inplace", [False, True])
def test_online_softmax_on_numpy_matches_dense(inplace):
    rng = np.random.default_rng(1)
    s, v = rng.standard_normal((2, 3, 5, 40)) * 4, rng.standard_normal((2, 3, 40, 7))
    keep = rng.random(s.shape) < 0.5
    keep[1, 2, 4] = False
    state = SoftmaxState(s.shape[:-1], 7, s, inplace=inplace)
    for s_tile, v_tile, k_tile in tiles_of(s, v, keep):
        state.update(s_tile.copy(), v_tile, k_tile, owned=True)
    rows = state.finish()
    ref = dense_softmax(*(torch.from_numpy(x) for x in (s, v, keep)))
    np.testing.assert_allclose(rows.out, ref.numpy(), atol=1e-12)
    assert rows.lse[1, 2, 4, 0] == -np.inf and rows.inv_sum[1, 2, 4, 0] == 0


def test_online_softmax_is_differentiable_by_torch_autograd():
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 4, 33, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    v = torch.randn(2, 33, 5, generator=gen, dtype=torch.float64).requires_grad_()
    keep = torch.rand(s.shape, generator=gen) < 0.7
    state = SoftmaxState(s.shape[:-1], 5, s)
    for s_tile, v_tile, k_tile in tiles_of(s, v, keep, width=8):
        state.update(s_tile, v_tile, k_tile)
    rows = state.finish()
    grads = torch.autograd.grad((rows.out ** 2).sum(), (s, v))
    ref = torch.autograd.grad((dense_softmax(s, v, keep) ** 2).sum(), (s, v))
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_sigmoid_state_sums_the_kept_weights():
    rng = np.random.default_rng(2)
    s, v = rng.standard_normal((3, 6, 40)), rng.standard_normal((3, 40, 4))
    keep = rng.random(s.shape) < 0.5
    state = SigmoidState(s.shape[:-1], 4, s, inplace=True)
    for tile in tiles_of(s, v, keep):
        state.update(*tile)
    rows = state.finish()
    np.testing.assert_allclose(rows.out, np.where(keep, 1 / (1 + np.exp(-s)), 0) @ v,
                               atol=1e-12)
    assert rows.lse is None


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_topk_threshold_keeps_every_tie_and_is_minus_inf_below_k(library):
    s = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 1.0, 2.0],
                  [1.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    keep = np.array([[True] * 8, [True, True, False, False, False, False, False, False]])
    if library == "torch":
        s, keep = torch.from_numpy(s), torch.from_numpy(keep)
    first = TopkThreshold(3, s.shape[:-1], s)
    for start in (0, 3, 6):
        first.update(s[..., start:start + 3], keep[..., start:start + 3])
    thr = np.asarray(first.value())
    assert thr[0, 0] == 2.0 and thr[1, 0] == -np.inf  # row 1 keeps 2 < 3 keys
    kept = np.asarray(TopkThreshold.keeps(s, first.value(), keep))
    assert kept[0].tolist() == [True, False, True, True, True, False, False, True]
    assert kept[1].tolist() == np.asarray(keep[1]).tolist()


@pytest.mark.parametrize("kind", ["elu1", "relu", "performer"])
def test_feature_maps_agree_on_numpy_and_torch(kind):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64) * 3
    omega = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    phi = feature_map(kind, x, omega)
    numpy_phi = feature_map(kind, x.numpy(), omega.numpy())
    np.testing.assert_allclose(numpy_phi, phi.numpy(), atol=1e-12)


def test_zero_denominator_gives_zero_and_no_gradient():
    num = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    den = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64,
                       requires_grad=True)
    out = divide(num, den[..., None])
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 0] == 0)
    d_out = torch.randn_like(out)
    d_num, d_den = torch.autograd.grad(out, (num, den), d_out)
    assert torch.all(d_num[0, 1] == 0) and torch.all(d_num[1, 0] == 0)
    assert d_den[0, 1] == 0 and d_den[1, 0] == 0


def test_nystrom_matches_the_reference_with_gqa():
    spec = attncc.load_spec({"attncc": 1, "name": "nystrom_gqa", "heads": 4, "kv_heads": 2,
                             "lowrank": {"method": "nystrom", "landmarks": 16}})
    q, k, v, _ = random_inputs(spec, 2, 64, 64, "float64")
    out = nystrom(q, k, v, spec.lowrank.size, q.shape[-1] ** -0.5)
    np.testing.assert_allclose(out, attncc.reference(spec, q, k, v), atol=1e-10)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    torch.testing.assert_close(nystrom(tq, tk, tv, 16, q.shape[-1] ** -0.5).numpy(), out)


def test_heads_are_grouped_without_copies():
    q, k = np.zeros((2, 6, 5, 4)), np.zeros((2, 3, 7, 4))
    q5 = split_heads(q, 3)
    assert q5.shape == (2, 3, 2, 5, 4) and np.shares_memory(q5, q)
    assert shared_kv(k).shape == (2, 3, 1, 7, 4) and np.shares_memory(shared_kv(k), k)
    assert merge_heads(q5).shape == q.shape
    e = np.ones((2, 7))
    assert linformer(k, k, e, e)[0].shape == (2, 3, 2, 4)


def test_layout_places_each_index_on_its_axes():
    layout = Layout(7, b=(0,), h=(1, 3), q_idx=(2, 4), kv_idx=(2, 5, 6))
    fixed = layout.fixed({"seq_q": 9}, {"slope": "x"}, np.arange(2), np.zeros((3, 4)))
    env = layout.env(fixed, np.zeros((5, 16)), np.zeros((5, 2, 8)))
    assert env["b"].shape == (2, 1, 1, 1, 1, 1, 1) and env["h"].shape == (1, 3, 1, 4, 1, 1, 1)
    assert env["q_idx"].shape == (1, 1, 5, 1, 16, 1, 1)
    assert env["kv_idx"].shape == (1, 1, 5, 1, 1, 2, 8)
    assert env["seq_q"] == 9 and env["slope"] == "x"
    with pytest.raises(ValueError, match="q_idx"):
        layout.place("q_idx", np.zeros(16))


def test_prologue_checks_kind_dtype_and_lse_and_casts():
    spec = attncc.load_spec("examples/alibi.yaml")
    node = attention_node(lower(spec))[1]
    q, k, v, ins = random_inputs(spec, 1, 8, 8, "float16")
    call = prologue(spec, node, q, k, v, ins, backend="numpy", library="numpy")
    assert call.q.dtype == np.float32 and call.dtype == np.float16 and call.group == 2
    assert call.inputs["slope"].dtype == np.float32 and call.raw_inputs["slope"] is ins["slope"]
    q64 = q.astype(np.float64)
    same = prologue(spec, node, q64, k.astype(np.float64), v.astype(np.float64), ins,
                    backend="numpy", library="numpy")
    assert same.q is q64
    with pytest.raises(InputError, match="backend='numpy'"):
        prologue(spec, node, q, k, v, ins, backend="torch", library="torch")
    with pytest.raises(InputError, match="computes float32 and float64"):
        prologue(spec, node, q, k, v, ins, backend="x", library="numpy",
                 dtypes=("float32", "float64"))
    sigmoid = attncc.load_spec("examples/sigmoid.yaml")
    with pytest.raises(InputError, match=r"return_lse.*normalize sigmoid"):
        prologue(sigmoid, attention_node(lower(sigmoid))[1], q, k, v, {}, backend="numpy",
                 library="numpy", return_lse=True)
