"""The numpy kernel's stats= and attention_map: return forms, and one clear error per bad
request (heads, rows, the 2 GiB cap, stats a normalisation does not define)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from spec_inputs import random_case

import attncc
from attncc.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def kernel_and_case(name, **sizes):
    spec = attncc.load_spec(EXAMPLES / f"{name}.yaml")
    return attncc.compile(spec, backend="numpy"), random_case(spec, **sizes)


def test_stats_with_return_lse_and_without():
    kernel, c = kernel_and_case("causal", seq_q=40)
    out, lse, stats = kernel(c.q, c.k, c.v, return_lse=True, stats=("lse", "entropy"))
    np.testing.assert_array_equal(stats["lse"], lse)
    plain = kernel(c.q, c.k, c.v)
    np.testing.assert_array_equal(out, plain)
    _, only = kernel(c.q, c.k, c.v, stats="max")
    assert set(only) == {"max"} and only["max"].shape == (2, 2, 40)
    # row 0 of a causal mask sees key 0 only: all its mass on the first token, distance 0
    _, st = kernel(c.q, c.k, c.v, stats=("mass_first", "mean_distance", "entropy"))
    np.testing.assert_allclose(st["mass_first"][..., 0], 1.0)
    np.testing.assert_allclose(st["mean_distance"][..., 0], 0.0)
    np.testing.assert_allclose(st["entropy"][..., 0], 0.0, atol=1e-12)


def test_rows_of_a_document_mask_with_no_key_give_zeros_and_minus_inf():
    kernel, c = kernel_and_case("key_padding", seq_q=32)
    c.inputs["lengths"][:] = 0
    _, st = kernel(c.q, c.k, c.v, stats=("lse", "max", "entropy"), **c.inputs)
    assert np.all(st["lse"] == -np.inf) and np.all(st["max"] == -np.inf)
    assert np.all(st["entropy"] == 0)
    assert not kernel.attention_map(c.q, c.k, c.v, rows=[0, 5], **c.inputs).any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"heads": [0, 2]}, r"heads: expected query head numbers in \[0, 2\); got \[2\]"),
    ({"heads": "all"}, r"heads: expected a non-empty sequence of query head numbers"),
    ({"rows": [40]}, r"rows: expected query rows in \[0, 40\); got \[40\]"),
    ({"rows": []}, r"rows: expected a non-empty sequence of query rows in \[0, 40\); got \[\]"),
])
def test_bad_heads_and_rows(kwargs, message):
    kernel, c = kernel_and_case("causal", seq_q=40)
    with pytest.raises(InputError, match=message):
        kernel.attention_map(c.q, c.k, c.v, **kwargs)


def test_a_map_above_the_memory_cap_asks_for_rows():
    kernel, _ = kernel_and_case("causal")
    big = np.zeros((1, 1, 32768, 4), np.float32)
    with pytest.raises(InputError, match=r"rows: expected a map of at most 2 GiB; got 4.0 GiB "
                                         r"\(batch 1 x 1 heads x 32768 rows x 32768 keys x 4 "
                                         r"bytes\); pass rows="):
        kernel.attention_map(big, big, big)
    assert kernel.attention_map(big[..., :64, :], big, big, rows=[63]).shape == (1, 1, 1, 32768)


@pytest.mark.parametrize(("name", "stat", "label"), [
    ("sigmoid", "lse", "normalize sigmoid"), ("sigmoid", "entropy", "normalize sigmoid"),
    ("linear_elu", "max", "normalize linear"), ("nystrom", "entropy", "low-rank nystrom"),
    ("linformer", "mean_distance", "low-rank linformer")])
def test_stats_a_normalisation_cannot_define(name, stat, label):
    kernel, c = kernel_and_case(name, seq_q=32)
    with pytest.raises(InputError, match=f"stats: '{stat}' is not defined for {label} "
                                         rf"\(.*\); expected some of .*; got '{stat}'"):
        kernel(c.q, c.k, c.v, stats=(stat,), **c.inputs)
