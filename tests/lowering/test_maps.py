"""attncc.lowering.maps on NumPy and torch: maps and per-row statistics from a kernel's own lse
match attncc.reference.attention_map / attention_stats on every example spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from spec_inputs import random_case

import attncc
from attncc.lowering.requests import DEFINED
from attncc.reference import attention_map, attention_stats, spec_kind

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "examples").iterdir()
                  if p.suffix in (".yaml", ".json", ".toml"))
ROWS, HEADS = [47, 3, 0, 20], [1, 0]


def defined(spec) -> list[str]:
    kind = spec_kind(spec)
    return [n for n in DEFINED[kind] if kind != "linformer" or n in DEFINED[spec.normalize]]


def as_torch(case, dtype):
    def t(x):
        x = torch.from_numpy(x)
        return x.to(dtype) if x.is_floating_point() else x
    return t(case.q), t(case.k), t(case.v), {n: t(x) for n, x in case.inputs.items()}


def close(got, want, tol):
    got = np.asarray(got, dtype=np.float64)
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    np.testing.assert_allclose(np.where(both_inf, 0, got), np.where(both_inf, 0, want),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_numpy_maps_and_stats_match_the_reference(path):
    spec = attncc.load_spec(path)
    case = random_case(spec, seq_q=48, seed=1)
    kernel = attncc.compile(spec, backend="numpy", config=None)
    got = kernel.attention_map(case.q, case.k, case.v, heads=HEADS, rows=ROWS, **case.inputs)
    want = attention_map(spec, case.q, case.k, case.v, heads=HEADS, rows=ROWS, **case.inputs)
    assert got.shape == (2, 2, 4, spec.memory_tokens + 48) == want.shape
    close(got, want, 1e-9)
    names = defined(spec)
    out, stats = kernel(case.q, case.k, case.v, stats=names, **case.inputs)
    ref = attention_stats(spec, case.q, case.k, case.v, stats=names, **case.inputs)
    close(out, attncc.reference(spec, case.q, case.k, case.v, **case.inputs), 1e-9)
    for name in names:
        assert stats[name].shape == (2, case.sizes["heads"], 48)
        close(stats[name], ref[name], 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_torch_maps_and_stats_match_the_reference(path, dtype):
    spec = attncc.load_spec(path)
    case = random_case(spec, seq_q=48, seed=2)
    q, k, v, inputs = as_torch(case, dtype)
    kernel = attncc.compile(spec, backend="torch")
    got = kernel.attention_map(q, k, v, heads=HEADS, rows=ROWS, **inputs)
    assert got.dtype == dtype and got.shape == (2, 2, 4, spec.memory_tokens + 48)
    want = attention_map(spec, case.q, case.k, case.v, heads=HEADS, rows=ROWS, **case.inputs)
    names = defined(spec)
    out, stats = kernel(q, k, v, stats=names, **inputs)
    ref = attention_stats(spec, case.q, case.k, case.v, stats=names, **case.inputs)
    if dtype == torch.float32 and spec.lowrank is not None and spec.lowrank.method == "nystrom":
        # pinv amplifies float32 rounding: the map must still reproduce the kernel's output
        group = case.sizes["heads"] // case.sizes["kv_heads"]
        values = v[:, [h // group for h in HEADS]]
        close((got @ values).numpy(), out[:, HEADS][:, :, ROWS].numpy(), 1e-3)
        return
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    close(got.numpy(), want, tol)
    for name in names:
        close(stats[name].numpy(), ref[name], tol * 10)


def test_a_map_is_the_weights_of_the_output_with_memory_tokens_first():
    spec = attncc.load_spec(EXAMPLES[[p.stem for p in EXAMPLES].index("memory_tokens")])
    case = random_case(spec, seq_q=40, seed=3)
    kernel = attncc.compile(spec, backend="numpy")
    maps = kernel.attention_map(case.q, case.k, case.v, **case.inputs)
    values = np.concatenate([np.broadcast_to(case.inputs["mem_v"], (2, 2, 4, 8)), case.v], 2)
    np.testing.assert_allclose(maps @ values, kernel(case.q, case.k, case.v, **case.inputs),
                               atol=1e-12)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-12)
    # causal: no weight above the diagonal of the key columns
    assert not np.triu(maps[..., 4:], 1).any()


def test_maps_of_a_long_sequence_touch_only_the_selected_rows():
    spec = attncc.load_spec(EXAMPLES[[p.stem for p in EXAMPLES].index("sliding_window")])
    n = 4096
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, 8)).astype(np.float32) for _ in range(3))
    kernel = attncc.compile(spec, backend="numpy")
    maps = kernel.attention_map(q, k, v, rows=[0, 4095])
    assert maps.shape == (1, 1, 2, n)
    window = spec.constants["window"]
    assert np.count_nonzero(maps[0, 0, 1]) <= window and maps[0, 0, 1, -1] > 0
