"""attncc.reference.attention_map and attention_stats: by hand on tiny cases, and the weights
reproduce the reference output for every normalisation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from spec_inputs import random_case

import attncc
from attncc.errors import InputError
from attncc.reference import attention_map, attention_stats

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def t(rows):
    return np.asarray(rows, dtype=np.float64)[None, None]


def spec(**keys):
    return attncc.load_spec({"attncc": 1, "scale": 1, **keys})


Q = t([[1.0, 0.0], [0.0, 1.0]])
V = t([[1.0, 2.0], [3.0, 4.0]])


def test_softmax_map_by_hand():
    w = math.e / (math.e + 1)
    np.testing.assert_allclose(attention_map(spec(), Q, Q, V)[0, 0], [[w, 1 - w], [1 - w, w]])
    causal = attention_map(spec(mask="kv_idx <= q_idx"), Q, Q, V)[0, 0]
    np.testing.assert_allclose(causal, [[1, 0], [1 - w, w]])


def test_sigmoid_map_is_unnormalised_and_topk_keeps_ties():
    sig = attention_map(spec(normalize="sigmoid"), Q, Q, V)[0, 0]
    s = 1 / (1 + math.exp(-1))
    np.testing.assert_allclose(sig, [[s, 0.5], [0.5, s]])
    q = t([[1.0], [1.0], [1.0]])
    k = t([[2.0], [1.0], [1.0]])
    top = attention_map(spec(normalize="topk", topk=2), q, k, k)[0, 0, 0]
    np.testing.assert_allclose(top, np.exp([2, 1, 1]) / np.exp([2, 1, 1]).sum())  # tie kept
    top1 = attention_map(spec(normalize="topk", topk=1), q, k, k)[0, 0, 0]
    np.testing.assert_allclose(top1, [1, 0, 0])


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.iterdir() if p.suffix in
                                        (".yaml", ".json", ".toml")), ids=lambda p: p.stem)
def test_the_map_on_tokens_reproduces_the_output(path):
    s = attncc.load_spec(path)
    c = random_case(s, seq_q=32, seed=4)
    maps = attention_map(s, c.q, c.k, c.v, **c.inputs)
    group = c.sizes["heads"] // c.sizes["kv_heads"]
    v = np.repeat(c.v, group, axis=1)
    if s.memory_tokens:
        mem_v = np.repeat(c.inputs["mem_v"], group, axis=0)
        v = np.concatenate([np.broadcast_to(mem_v, (v.shape[0], *mem_v.shape)), v], axis=2)
    np.testing.assert_allclose(maps @ v, attncc.reference(s, c.q, c.k, c.v, **c.inputs),
                               atol=1e-10)
    part = attention_map(s, c.q, c.k, c.v, heads=[0], rows=slice(30, 2, -5), **c.inputs)
    np.testing.assert_array_equal(part, maps[:, [0]][:, :, [30, 25, 20, 15, 10, 5]])


def test_stats_by_their_definitions():
    w = math.e / (math.e + 1)
    st = attention_stats(spec(), Q, Q, V, stats=STATS)
    np.testing.assert_allclose(st["lse"][0, 0], [math.log(math.e + 1)] * 2)
    np.testing.assert_allclose(st["max"][0, 0], [1, 1])
    np.testing.assert_allclose(st["entropy"][0, 0], [-(w * math.log(w) + (1 - w) *
                                                      math.log(1 - w))] * 2)
    np.testing.assert_allclose(st["mass_first"][0, 0], [w, 1 - w])
    np.testing.assert_allclose(st["mean_distance"][0, 0], [1 - w, 1 - w])
    np.testing.assert_allclose(st["mass_memory"][0, 0], [0, 0])


STATS = ("lse", "max", "entropy", "mass_first", "mass_memory", "mean_distance")


def test_bad_requests_name_the_argument():
    with pytest.raises(InputError, match=r"heads: expected query head numbers in \[0, 1\); "
                                         r"got \[3\]"):
        attention_map(spec(), Q, Q, V, heads=[3])
    with pytest.raises(InputError, match=r"rows: expected query rows in \[0, 2\); got \[-1\]"):
        attention_map(spec(), Q, Q, V, rows=[-1])
    with pytest.raises(InputError, match="rows: expected a non-empty sequence"):
        attention_map(spec(), Q, Q, V, rows=[0.5])
    with pytest.raises(InputError, match=r"stats: 'entropy' is not defined for normalize "
                                         r"sigmoid .*; expected some of max, .*got 'entropy'"):
        attention_stats(spec(normalize="sigmoid"), Q, Q, V, stats=("entropy",))
    with pytest.raises(InputError, match=r"stats: expected names from lse, .*got 'nope'"):
        attention_stats(spec(), Q, Q, V, stats=("nope",))
