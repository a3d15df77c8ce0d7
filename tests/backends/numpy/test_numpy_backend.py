"""Unit tests of the tiled NumPy backend (plugins/attncc_numpy)."""

import numpy as np
import pytest

import attncc
from attncc.backends import registry
from attncc.errors import BackendError, InputError
from attncc.ir.build import build
from attncc.ir.graph import attention_node
from attncc.lowering import env as lowering_env
from attncc.lowering.states import SoftmaxState
from attncc.passes.pipeline import lower
from attncc.plan import EMPTY, FULL, PARTIAL
from attncc.testing import random_inputs
from attncc_numpy import NumpyBackend

BACKEND = NumpyBackend()


def compile_numpy(spec, **config):
    """lower + NumpyBackend.compile, the path attncc.compile takes for backend='numpy'."""
    graph = lower(attncc.load_spec(spec))
    return BACKEND.compile(graph, {**BACKEND.default_config(graph, None), **config}, None)


def spec_dict(**fields):
    return {"attncc": 1, "name": "t", **fields}


def test_registered_under_its_entry_point():
    assert isinstance(registry.get("numpy"), NumpyBackend)


def test_online_softmax_over_tiles_equals_dense_softmax():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 1, 5, 40)) * 4
    v = rng.standard_normal((2, 3, 1, 40, 7))
    keep = rng.random(s.shape) < 0.6
    keep[0, 0, 0, 2] = False  # one row with no kept key
    state = SoftmaxState(s.shape[:-1], 7, s)
    for start in range(0, 40, 16):
        cols = slice(start, start + 16)
        state.update(s[..., cols], v[..., cols, :], keep[..., cols])
    out, lse = state.finish()[:2]
    lse = lse[..., 0]
    masked = np.where(keep, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.exp(masked - masked.max(-1, keepdims=True))
        dense = np.nan_to_num((weights / weights.sum(-1, keepdims=True)) @ v)
        dense_lse = np.log(np.exp(masked).sum(-1))
    np.testing.assert_allclose(out, dense, atol=1e-12)
    np.testing.assert_allclose(lse, dense_lse, atol=1e-12)
    assert out[0, 0, 0, 2].tolist() == [0.0] * 7 and lse[0, 0, 0, 2] == -np.inf


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (32, 16), (256, 256)])
def test_matches_reference_for_any_tiles(block_m, block_n):
    spec = attncc.load_spec("examples/sliding_window.yaml")
    kernel = compile_numpy(spec, block_m=block_m, block_n=block_n)
    q, k, v, _ = random_inputs(spec, 2, 90, 90, "float64", seed=3)
    out, lse = kernel(q, k, v, return_lse=True)
    ref, ref_lse = attncc.reference(spec, q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


def counting(monkeypatch):
    """Count evaluate() calls made by the tiles (score_mod and mask evaluation)."""
    calls = []
    real = lowering_env.evaluate

    def wrapped(expr, env, xp):
        calls.append(expr)
        return real(expr, env, xp)

    monkeypatch.setattr(lowering_env, "evaluate", wrapped)
    return calls


def test_full_blocks_skip_the_mask(monkeypatch):
    spec = attncc.load_spec("examples/causal.yaml")
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 1, 64, 64, "float64")
    calls = counting(monkeypatch)
    out = kernel(q, k, v)
    counts = kernel.last_plan.counts()
    assert counts == {"FULL": 6, "PARTIAL": 4, "EMPTY": 6}
    assert kernel.last_stats.full == 6 and kernel.last_stats.partial == 4
    assert len(calls) == counts["PARTIAL"], "the mask must be evaluated on PARTIAL blocks only"
    np.testing.assert_allclose(out, attncc.reference(spec, q, k, v), atol=1e-12)


def test_dense_spec_evaluates_nothing(monkeypatch):
    spec = attncc.load_spec("examples/dense.yaml")
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 1, 40, 40, "float32")
    calls = counting(monkeypatch)
    kernel(q, k, v)
    assert calls == [] and kernel.last_stats.full == 9


def record_tiles(monkeypatch):
    seen = []
    real = lowering_env.raw_scores

    def raw(q_tile, k_tile, scale, w=None):  # the key blocks' scores (no memory tokens here)
        seen.append((q_tile.shape, k_tile))
        return real(q_tile, k_tile, scale, w)

    monkeypatch.setattr(lowering_env, "raw_scores", raw)
    return seen


def test_empty_blocks_are_not_visited(monkeypatch):
    spec = attncc.load_spec("examples/sliding_window.yaml")  # window 32
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 1, 128, 128, "float32")
    seen = record_tiles(monkeypatch)
    kernel(q, k, v)
    states = kernel.last_plan.states
    visited = int(np.count_nonzero(states != EMPTY))
    assert len(seen) == visited < states.size // 2
    assert kernel.last_stats.full == int(np.count_nonzero(states == FULL))
    assert kernel.last_stats.partial == int(np.count_nonzero(states == PARTIAL))


def test_gqa_reads_kv_heads_without_copying(monkeypatch):
    spec = attncc.load_spec("examples/gqa.yaml")  # 8 query heads, 2 kv heads
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 2, 40, 40, "float32")
    seen = record_tiles(monkeypatch)
    out = kernel(q, k, v)
    assert seen
    for q_shape, k_tile in seen:
        assert q_shape[:3] == (2, 2, 4)  # (batch, kv_heads, group)
        assert k_tile.shape[:3] == (2, 2, 1)  # broadcast over the group, never repeated
        assert np.shares_memory(k_tile, k), "key tiles must be views of the caller's k"
    np.testing.assert_allclose(out, attncc.reference(spec, q, k, v), atol=2e-6)


def test_plan_per_head_when_the_mask_reads_h():
    spec = attncc.load_spec(spec_dict(mask="kv_idx <= q_idx - 8 * h", heads=3))
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 2, 50, 50, "float64")
    out, lse = kernel(q, k, v, return_lse=True)
    assert kernel.last_plan.states.shape[:2] == (1, 3)
    ref, ref_lse = attncc.reference(spec, q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))


def test_topk_with_fewer_kept_keys_than_k_and_many_tiles():
    spec = attncc.load_spec(spec_dict(normalize="topk", topk=20, mask="kv_idx <= q_idx",
                                      memory_tokens=2))
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, ins = random_inputs(spec, 2, 70, 70, "float64", seed=5)
    out, lse = kernel(q, k, v, return_lse=True, **ins)
    ref, ref_lse = attncc.reference(spec, q, k, v, return_lse=True, **ins)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


def test_rows_without_kept_keys_give_zero_and_minus_inf():
    spec = attncc.load_spec("examples/decoding.yaml")
    kernel = compile_numpy(spec, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(spec, 1, 40, 10, "float32")
    out, lse = kernel(q, k, v, return_lse=True)
    assert np.all(out[:, :, :30] == 0) and np.all(np.isneginf(lse[:, :, :30]))
    assert np.all(np.isfinite(lse[:, :, 30:]))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_output_dtype_follows_the_input(dtype):
    spec = attncc.load_spec("examples/alibi.yaml")
    kernel = compile_numpy(spec)
    q, k, v, ins = random_inputs(spec, 1, 20, 20, dtype)
    assert kernel(q, k, v, **ins).dtype == np.dtype(dtype)


def test_linear_chunks_do_not_change_the_result():
    spec = attncc.load_spec("examples/linear_elu.yaml")
    q, k, v, _ = random_inputs(spec, 2, 45, 60, "float64")
    outs = [compile_numpy(spec, chunk=c)(q, k, v) for c in (16, 32, 256)]
    ref = attncc.reference(spec, q, k, v)
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=1e-12)


def test_bad_inputs_raise_input_error():
    spec = attncc.load_spec("examples/alibi.yaml")
    kernel = compile_numpy(spec)
    q, k, v, ins = random_inputs(spec, 1, 8, 8, "float32")
    with pytest.raises(InputError, match="missing input 'slope'"):
        kernel(q, k, v)
    with pytest.raises(InputError, match="k: expected shape"):
        kernel(q, k[:, :, :4], v, **ins)
    with pytest.raises(InputError, match="NumPy arrays"):
        kernel(q.tolist(), k, v, **ins)
    with pytest.raises(InputError, match="floating dtype"):
        kernel(q.astype(np.int32), k, v, **ins)
    with pytest.raises(InputError, match="one dtype"):
        kernel(q, k.astype(np.float64), v, **ins)
    torch = pytest.importorskip("torch")
    with pytest.raises(InputError, match="backend='torch'"):
        kernel(torch.from_numpy(q), k, v, **ins)
    sig = compile_numpy("examples/sigmoid.yaml")
    with pytest.raises(InputError, match="return_lse"):
        sig(q, k, v, return_lse=True)


def test_search_space_and_config_checks():
    graph = lower(attncc.load_spec("examples/causal.yaml"))
    space = BACKEND.search_space(graph, None)
    assert set(space.params) == {"block_m", "block_n"}
    configs = space.configs()
    assert BACKEND.default_config(graph, None) in configs
    assert {"block_m": 16, "block_n": 16} in configs
    assert not space.keep({"block_m": 512, "block_n": 256})
    graph.graph["sizes"] = {"seq_q": 8, "seq_k": 8}
    small = BACKEND.search_space(graph, None)
    assert small.keep({"block_m": 16, "block_n": 64}) and not small.keep({"block_m": 128,
                                                                          "block_n": 16})
    assert set(BACKEND.search_space(lower("examples/linear_elu.yaml"), None).params) == {"chunk"}
    assert BACKEND.search_space(lower("examples/nystrom.yaml"), None).params == {}
    with pytest.raises(BackendError, match="unknown tunable 'bogus'"):
        BACKEND.compile(graph, {"bogus": 3}, None)
    with pytest.raises(BackendError, match="is not a value"):
        BACKEND.compile(graph, {"block_m": 0}, None)


def test_supports_lowered_graphs_on_cpu_only():
    spec = attncc.load_spec("examples/causal.yaml")
    assert BACKEND.supports(lower(spec), None)
    unfused = BACKEND.supports(build(spec), None)
    assert not unfused and "lower" in unfused.reason

    class Cuda:
        kind = "cuda"

    refused = BACKEND.supports(lower(spec), Cuda())
    assert not refused and "CPU" in refused.reason


def test_source_describes_the_lowering():
    """The text is built from the node the kernel runs: its path and why, its config, and a step
    per expression the spec has (no mask step where there is no mask)."""
    kernel = compile_numpy("examples/sliding_window.yaml", block_m=32, block_n=64)
    node = attention_node(lower("examples/sliding_window.yaml"))[1]
    src = kernel.source
    assert "tiles" in src and node.lowering.why("tiles") in src
    assert "block_m=32" in src and "block_n=64" in src
    dense = compile_numpy("examples/dense.yaml", block_m=32, block_n=64).source
    assert any("kv_idx" in line for line in src.splitlines())
    assert not any("kv_idx" in line for line in dense.splitlines())
    for name, path in (("linear_elu", "scan"), ("nystrom", "nystrom")):
        other = lower(f"examples/{name}.yaml")
        assert attention_node(other)[1].lowering.why(path) in compile_numpy(
            f"examples/{name}.yaml").source
    assert kernel.backward is None
